"""Hot kernels: the one seam between the model and how its weights are stored.

Every product with a weight matrix goes through `linear`, and the embedding lookup through `embedding_rows`.
Both dispatch on the weight's type (weights.py): a plain float32 ndarray, 16-bit storage, int8 or int4, so
model.py and layers.py read the same for every format. Call them through the module (`kernels.linear(...)`),
so that a faster backend can be swapped in at run time.

The NumPy reference for a stored (non-float32) weight is the readable definition: dequantize a block of rows
to float32, multiply, move on. It never widens a whole matrix at once: a float16 LM head of the 270M model
widened in full would be 670 MB per token.

(The two products inside attention, q.k and probs.v, have no weights and stay in layers.attention.)
"""

from __future__ import annotations

import numpy as np

from .weights import block_rows


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T, a bias-free linear layer with the weight stored (out, in) as in Hugging Face and GGUF.

    Shapes: (T, in), (out, in) -> (T, out) float32
    """
    if isinstance(w, np.ndarray):
        return x @ w.T
    out_features, in_features = w.shape
    out = np.empty((x.shape[0], out_features), np.float32)
    step = block_rows(in_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = x @ w.rows(start, stop).T  # (T, in) @ (in, R) -> (T, R)
    return out


def embedding_rows(table, token_ids: np.ndarray) -> np.ndarray:
    """The rows of the embedding table for these token ids, as float32.

    Shapes: (V, D), (T,) int -> (T, D)
    """
    if isinstance(table, np.ndarray):
        return table[token_ids].astype(np.float32, copy=False)
    return np.concatenate([table.rows(i, i + 1) for i in np.asarray(token_ids).tolist()])
