"""`python -m minigemma generate PROMPT` (also installed as `minigemma`).

Text streams to stdout; progress and diagnostics go to stderr. Errors are one line on stderr: exit code 2
for a bad command line, 1 for anything that fails after that (a missing file, a prompt too long, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from .loading import QUANTIZE_CHOICES


class UsageError(Exception):
    """A bad flag value found after parsing (exit code 2, like argparse's own errors)."""


def whole_number(text: str) -> int:
    """argparse type for counts: an int >= 0, or a usage error that says so."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigemma", description="A readable NumPy Gemma.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt (or answer it, with --chat)")
    g.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    g.add_argument("--max-new-tokens", type=whole_number, default=64, help="default: 64")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=whole_number, default=0, help="0 = off (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    g.add_argument("--min-p", type=float, default=0.0, help="0 = off (default)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat format")
    g.add_argument("--system", default=None, help="with --chat: a system message, folded into the user turn")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence/end-of-turn")
    g.add_argument("--quantize", default="none", choices=[q for q in QUANTIZE_CHOICES if q],
                   help="weight quantization (default: none)")
    g.add_argument("--backend", default=None, choices=["numba", "numpy"],
                   help="kernels: numba (compiled; the default where installed, or $MINIGEMMA_BACKEND) or numpy "
                        "(the readable reference); same answers")
    g.add_argument("--stats", action="store_true",
                   help="print timing and memory as one JSON line, the last line of stderr")
    return parser


def generate_command(args) -> int:
    from .generate import Sampling, Stats, chat_prompt, generate
    from .loading import load

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    try:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    except ValueError as e:  # a bad value is a usage error, found before the slow load
        raise UsageError(str(e)) from None

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        prompt = chat_prompt(prompt, system=args.system)

    start = time.perf_counter()
    model = load(args.model, quantize=None if args.quantize == "none" else args.quantize, backend=args.backend)
    load_s = time.perf_counter() - start
    ids = model.tokenizer.encode(prompt, add_bos=True)

    stats = Stats()
    for chunk in generate(model, ids, sampling, stats):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        report = {**stats.as_dict(), "load_s": round(load_s, 3), "peak_rss_mb": round(peak_mb, 1)}
        print(json.dumps(report), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with code 2 and a usage line on bad flags
    try:
        return generate_command(args)
    except UsageError as e:
        parser.error(str(e))  # exit 2
    except BrokenPipeError:  # the reader went away (e.g. piped into `head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush can't fail again
        return 0
    except MemoryError:
        print("minigemma: error: out of memory (try a shorter prompt or a smaller model)", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError, IndexError) as e:
        print(f"minigemma: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
