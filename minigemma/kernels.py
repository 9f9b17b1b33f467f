"""Backends: which functions run the hot operations of a model. A backend is a value the model holds.

Every product with a weight matrix, the embedding lookup, attention, RMSNorm, RoPE and the MLP's activation go
through the model's backend (`model.backend`, passed down `forward` as `ops`), so model.py reads the same for every
weight type and for both backends:

    ops.linear(x, w)                  x @ w.T for a float32, 16-bit, int8 or int4 weight     (T, in) -> (T, out)
    ops.linears(x, w1, w2, ...)       [x @ w.T for each]: q, k, v or gate, up, in one call   -> [(T, out_i)]
    ops.linear_backward(dy, x, w, dw) its gradient: dy @ W (and dW += dy^T x if asked; training) -> (T, in)
    ops.embedding_rows(table, ids)    rows of the embedding table as float32                 (T,) -> (T, D)
    ops.attention(q, k, v, q_pos, k_pos, window, scale, cap)   causal (sliding) attention    -> (H, T, Dh)
    ops.rms_norm(x, w, eps)           RMSNorm with Gemma's (1 + w)                           (..., N) -> (..., N)
    ops.apply_rope(x, cos, sin)       the rotary embedding, split-half pairs                 (N, T, Dh) -> (N, T, Dh)
    ops.geglu(g, u)                   the MLP's gated activation, gelu_tanh(g) * u           (T, F) x2 -> (T, F)
    ops.prepare(w)                    a weight, in the layout this backend's kernels read best (at load time)

Two backends, with the same answers (within float32 summation order; tests/test_kernels.py):

    NUMPY    the readable reference: the functions of layers.py, nothing compiled. `minigemma.load()` gives
             this one, so that a reader who steps into `model.forward` in a debugger or a notebook reads the
             definitions.
    numba    compiled twins of the same operations (kernels_numba.py), for speed: `get("numba")`,
             `minigemma.load(backend="numba")`; the command line and the benchmarks use it by default.

Two models with different backends can live in one process: nothing here is a global that a later `load()`
changes. Choosing numba the first time also sets up what its kernels need (thread count, malloc settings:
kernels_numba.configure); the reference needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import layers


@dataclass(frozen=True)
class Backend:
    """The hot operations of a model, as functions with the signatures above, and a name to show."""

    name: str
    linear: Callable
    linears: Callable
    linear_backward: Callable
    embedding_rows: Callable
    attention: Callable
    rms_norm: Callable
    apply_rope: Callable
    geglu: Callable
    prepare: Callable

    def __repr__(self):
        return f"Backend({self.name!r})"


def _as_is(w):
    """The NumPy reference reads every weight type as it is stored."""
    return w


NUMPY = Backend("numpy", linear=layers.linear, linears=layers.linears, linear_backward=layers.linear_backward,
                embedding_rows=layers.embedding_rows, attention=layers.causal_attention, rms_norm=layers.rms_norm,
                apply_rope=layers.apply_rope, geglu=layers.geglu, prepare=_as_is)

BACKENDS = ("numpy", "numba")
_numba: Backend | None = None  # built on first request: importing Numba takes a second


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def get(name: str | Backend = "numpy") -> Backend:
    """The backend called `name` ("numpy" or "numba"); a Backend is returned as it is."""
    global _numba
    if isinstance(name, Backend):
        return name
    if name == "numpy":
        return NUMPY
    if name != "numba":
        raise ValueError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    if _numba is None:
        if not numba_available():
            raise ValueError("backend='numba' needs the numba package (pip install numba)")
        from . import kernels_numba

        kernels_numba.configure()
        _numba = Backend("numba", linear=kernels_numba.linear, linears=kernels_numba.linears,
                         linear_backward=kernels_numba.linear_backward, embedding_rows=kernels_numba.embedding_rows,
                         attention=kernels_numba.attention, rms_norm=kernels_numba.rms_norm,
                         apply_rope=kernels_numba.apply_rope, geglu=kernels_numba.geglu,
                         prepare=kernels_numba.prepare)
    return _numba
