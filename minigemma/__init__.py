"""minigemma: a readable pure-NumPy reference implementation of Gemma 1, 2 and 3 text models."""

import os as _os

# Two process settings that NumPy reads once, when it is imported, so they are made here, before this package
# imports it: `python -m minigemma` imports the package before its __main__ runs, so __main__ would be too
# late. setdefault: a user's own value wins; a program that imported NumPy before minigemma keeps NumPy's
# defaults. Both were measured on the AMD EPYC virtual machine of docs/performance.md (docs/kernels.md, "Threads").
#   OPENBLAS_THREAD_TIMEOUT=24: after each product, OpenBLAS's idle worker spins 2^24 cycles (a few ms), then
#     sleeps. The default, 2^28 (~0.1 s), holds a core that the Numba kernels of the next decode step need
#     (the first tokens after a prefill took 40 ms instead of 11); 2^10 made each of a prefill's ~500 products
#     wake a sleeping worker (12% of a 500-token prefill).
#   NUMPY_MADVISE_HUGEPAGE=0: NumPy asks the kernel for 2 MB pages for every large array. On a virtual machine
#     a fresh 2 MB page can cost milliseconds to back: loading the built-in model in float32 (a 670 MB
#     embedding) took 7-12 s instead of 3, with the same decode and prefill speed.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "24")
_os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from .config import GemmaConfig  # noqa: E402
from .loading import load  # noqa: E402
from .model import Gemma  # noqa: E402

__all__ = ["load", "Gemma", "GemmaConfig"]
__version__ = "0.1.0"
