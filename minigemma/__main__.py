import os

# The command line runs the Numba backend by default, where two thread pools share the cores: OpenBLAS's
# (prefill's sgemm) and Numba's (decode's kernels). OpenBLAS keeps its idle worker spinning for ~0.1 s after
# each product, holding a core that decode's threads need next (the first tokens after a prefill took 40 ms
# instead of 11). OpenBLAS reads this when NumPy is imported, so it is set here, before anything imports NumPy;
# setdefault: a user's own setting wins (docs/kernels.md, "Threads").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing NumPy & co.: as quiet as later
    raise SystemExit(130) from None

raise SystemExit(main())
