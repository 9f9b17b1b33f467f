"""minigemma: a readable pure-NumPy reference implementation of Gemma 1, 2 and 3 text models."""

import os

# Two thread pools share the cores: OpenBLAS's (prefill's sgemm) and Numba's OpenMP threads (decode's kernels).
# By default each keeps its idle threads spinning after its work, holding cores the other one needs next:
# GNU OpenMP for ~300,000 rounds (measured: a dequantize + sgemm pair took 14.4 ms instead of 5.6), OpenBLAS
# for 2^28 cycles, ~0.1 s (the first three decoded tokens after a prefill took 40 ms instead of 11). These
# make both go to sleep soon: 3,000 rounds keep Numba's threads warm between a decode step's loops (84 tok/s;
# 56 when they sleep at once), 2^10 cycles cost sgemm nothing measurable. The libraries read them when they
# load: OpenMP when Numba first runs a parallel kernel, OpenBLAS when NumPy is imported, so the second takes
# effect only if minigemma is imported before NumPy (as `python -m minigemma` does). setdefault: a user's own
# settings win. docs/performance.md has the numbers.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")

from .config import GemmaConfig  # noqa: E402
from .loading import load  # noqa: E402
from .model import Gemma  # noqa: E402

__all__ = ["load", "Gemma", "GemmaConfig"]
__version__ = "0.1.0"
