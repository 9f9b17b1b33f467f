"""Hot kernels. Every matrix product of the model goes through `linear`, so a faster or quantized
version can replace it without touching the model code.
"""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T, a bias-free linear layer with the weight stored (out, in) as in Hugging Face and GGUF.

    Shapes: (T, in), (out, in) -> (T, out)
    """
    return x @ w.T
