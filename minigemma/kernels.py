"""Hot kernels: the one seam between the model and how its weights are stored.

Every product with a weight matrix goes through `linear`, and the embedding lookup through `embedding_rows`.
Both dispatch on the weight's type (weights.py): a plain float32 ndarray, 16-bit storage, int8 or int4, so
model.py and layers.py read the same for every format. Call them through the module (`kernels.linear(...)`),
so that a faster backend can be swapped in at run time.

The NumPy reference for a stored (non-float32) weight is the readable definition: dequantize a block of rows
to float32, multiply, move on. It never widens a whole matrix at once: a float16 LM head of the 270M model
widened in full would be 670 MB per token.

Attention goes through `attention` here too: the NumPy version is layers.attention with its mask built from
positions; the Numba one never builds the (T, S) matrix. And RMSNorm through `rms_norm` (layers.rms_norm):
with ~110 calls per decoded token, NumPy's per-call overhead made it a tenth of a decode step.

Backends. The functions in this module are the NumPy reference. `use_backend("numba")` rebinds `linear`,
`attention`, `rms_norm` and `prepare` in this module to their compiled twins in kernels_numba.py (same
signatures, same answers within float32 summation order); `use_backend("numpy")` puts these back. That is
why everything calls `kernels.linear(...)` through the module. The backend is one per process:
`minigemma.load(..., backend=...)`, the environment variable MINIGEMMA_BACKEND, or `--backend` choose it; by
default it is numba where Numba imports, else numpy. Weights loaded for one backend work on the other (slower:
`prepare` chose their layout for the backend of the load).
"""

from __future__ import annotations

import os

import numpy as np

from . import layers  # (layers calls kernels too: a module import resolves names at call time)
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
    if hasattr(table, "take"):  # the packed layouts gather rows directly (weights.Int8x64)
        return table.take(token_ids)
    return np.concatenate([table.rows(i, i + 1) for i in np.asarray(token_ids).tolist()])


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, k_positions: np.ndarray,
              window: int | None, scale: float, cap: float | None) -> np.ndarray:
    """Attention of queries at `q_positions` over keys at `k_positions`: causal, and on a sliding layer only
    the last `window` positions (layers.attention_mask); scale, soft-cap, mask, softmax (layers.attention).

    Shapes: q (H, T, Dh), k, v (K, S, Dh), (T,), (S,) -> (H, T, Dh)
    """
    return layers.attention(q, k, v, layers.attention_mask(q_positions, k_positions, window), scale, cap)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with Gemma's (1 + w) gain: layers.rms_norm, the definition.

    Shapes: (..., N), (N,) -> (..., N)
    """
    return layers.rms_norm(x, weight, eps)


def prepare(w):
    """A weight in the layout this backend's kernels read best: for NumPy, as it is."""
    return w


# ---- choosing the backend ------------------------------------------------------------------------------------

BACKENDS = ("numpy", "numba")
REFERENCE = {"linear": linear, "attention": attention, "rms_norm": rms_norm,
             "prepare": prepare}  # the NumPy definitions, kept
backend = "numpy"  # the one in use


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend() -> str:
    """MINIGEMMA_BACKEND if set, else numba where it imports, else numpy."""
    name = os.environ.get("MINIGEMMA_BACKEND", "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"MINIGEMMA_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
        return name
    return "numba" if numba_available() else "numpy"


def use_backend(name: str | None = None) -> str:
    """Make `name` (None: default_backend()) the backend of every kernel call from now on; returns it."""
    global backend
    name = default_backend() if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "numba":
        if not numba_available():
            raise ValueError("backend='numba' needs the numba package (pip install numba)")
        from . import kernels_numba

        kernels_numba.configure()
        table = {"linear": kernels_numba.linear, "attention": kernels_numba.attention,
                 "rms_norm": kernels_numba.rms_norm, "prepare": kernels_numba.prepare}
    else:
        table = REFERENCE
    globals().update(table)
    backend = name
    keep_freed_memory()
    return name


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed arrays of up to 64 MB for reuse instead of giving them back to the OS.

    A forward pass makes temporaries of a few MB each (activations, products, the GELU's terms). By default
    glibc serves big requests with fresh mmap pages and trims its heap as soon as 8 MB or so are free at the
    top, so the next pass touches new pages again: a page fault per 4 KB, which cost ~20% of a 500-token
    prefill here (638 -> 797 tok/s with these settings; peak RSS the same, 593 MB). This is what
    MALLOC_MMAP_THRESHOLD_=64M MALLOC_TRIM_THRESHOLD_=256M would do. It is process-wide: a long-running
    process may keep up to 256 MB of freed memory. Left alone if either variable is set, if GLIBC_TUNABLES
    tunes malloc, or with MINIGEMMA_KEEP_FREED_MEMORY=0. Linux with glibc only; elsewhere nothing happens.
    Once per process."""
    global _malloc_tuned
    if _malloc_tuned or any(f"MALLOC_{k}_THRESHOLD_" in os.environ for k in ("MMAP", "TRIM")) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or os.environ.get("MINIGEMMA_KEEP_FREED_MEMORY", "1").strip() == "0":
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc


_malloc_tuned = False
