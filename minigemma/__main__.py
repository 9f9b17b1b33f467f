import os

# The command line runs the Numba backend by default, where two thread pools share the cores: OpenBLAS's
# (prefill's sgemm) and Numba's (decode's kernels). After each product OpenBLAS keeps its idle worker spinning
# for 2^THREAD_TIMEOUT cycles, then puts it to sleep. The default, 2^28 cycles (~0.1 s), holds a core that
# decode's threads need next (the first tokens after a prefill took 40 ms instead of 11); 2^10 (~0 s) made
# every one of a prefill's ~500 products wake a sleeping worker (12% of a 500-token prefill on the AMD EPYC
# virtual machine of docs/performance.md). 2^24 cycles, a few ms, outlasts the gaps between a prefill's
# products and ends soon after it.
# OpenBLAS reads this when NumPy is imported, so it is set here, before anything imports NumPy;
# setdefault: a user's own setting wins (docs/kernels.md, "Threads").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "24")

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing NumPy & co.: as quiet as later
    raise SystemExit(130) from None

raise SystemExit(main())
