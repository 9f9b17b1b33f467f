# `python -m minigemma`: the package's __init__ has already run, setting the process defaults NumPy must see
# before it loads (OpenBLAS's thread timeout, NumPy's huge pages: minigemma/__init__.py).
try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing NumPy & co.: as quiet as later
    raise SystemExit(130) from None

raise SystemExit(main())
