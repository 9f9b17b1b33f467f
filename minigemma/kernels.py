"""Hot kernels. Every product with a weight matrix goes through `linear`, so a faster or quantized
version can replace it without touching the model code. (The two products inside attention, q.k and
probs.v, have no weights and stay in layers.attention.)
"""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T, a bias-free linear layer with the weight stored (out, in) as in Hugging Face and GGUF.

    Shapes: (T, in), (out, in) -> (T, out)
    """
    return x @ w.T
