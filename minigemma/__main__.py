try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing NumPy & co.: as quiet as later
    raise SystemExit(130) from None

raise SystemExit(main())
