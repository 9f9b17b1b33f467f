"""minigemma: a readable pure-NumPy reference implementation of Gemma 1, 2 and 3 text models."""

import os

# Two thread pools share the cores: OpenBLAS's (prefill's sgemm) and Numba's OpenMP threads (decode's kernels).
# OpenBLAS keeps its idle worker spinning for 2^28 cycles, ~0.1 s, after each product, holding a core that
# decode's threads need next: the first three tokens decoded after a prefill took 40 ms instead of 11. 2^10
# cycles cost sgemm nothing measurable. OpenBLAS reads this when NumPy is imported, so it takes effect only if
# minigemma is imported before NumPy (as `python -m minigemma` does); setdefault: a user's own setting wins.
# (Prefill runs no parallel Numba loop, so OpenMP's own spinning is left at its default: cutting it to 3,000
# rounds made one process in ~12 decode at half speed throughout. docs/kernels.md, "Threads".)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")

from .config import GemmaConfig  # noqa: E402
from .loading import load  # noqa: E402
from .model import Gemma  # noqa: E402

__all__ = ["load", "Gemma", "GemmaConfig"]
__version__ = "0.1.0"
