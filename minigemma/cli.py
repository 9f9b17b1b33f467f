"""`python -m minigemma generate PROMPT` and `python -m minigemma chat` (also installed as `minigemma`).

Text streams to stdout; progress and diagnostics go to stderr. Errors are one line on stderr: exit code 2
for a bad command line, 1 for anything that fails after that (a missing or broken file, a prompt too long,
...); `--debug` adds the traceback. Ctrl-C stops at once with exit code 130, keeping what was printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from contextlib import contextmanager

from .errors import ContextOverflow, MinigemmaError, UsageError
from .loading import QUANTIZE_CHOICES


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (argparse prints the usage first), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_number(text: str) -> int:
    """argparse type for counts: an int >= 0, or a usage error that says so."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def finite_number(text: str) -> float:
    """argparse type for sampling values: a finite float (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_model_flags(p: argparse.ArgumentParser):
    """Which model, and how to hold it: shared by every command that loads one."""
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    p.add_argument("--quantize", default="none", choices=[q for q in QUANTIZE_CHOICES if q],
                   help="weight quantization (default: none)")
    # also accepted after the command; SUPPRESS keeps `minigemma --debug generate ...` working too
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the Python traceback")


def add_sampling_flags(p: argparse.ArgumentParser):
    """How to pick tokens (generate.Sampling): shared by generate and chat."""
    p.add_argument("--max-new-tokens", type=whole_number, default=64, help="default: 64")
    p.add_argument("--temperature", type=finite_number, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=whole_number, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=finite_number, default=1.0, help="1 = off (default)")
    p.add_argument("--min-p", type=finite_number, default=0.0, help="0 = off (default)")
    p.add_argument("--repetition-penalty", type=finite_number, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=whole_number, default=None,
                   help="random seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")


def sampling_from_args(args, **extra):
    """The Sampling the flags describe; a bad value is a usage error, found before the slow load."""
    from .generate import Sampling

    try:
        return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, stop=tuple(args.stop), **extra)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_model(args):
    from .loading import load

    return load(args.model, quantize=None if args.quantize == "none" else args.quantize)


def as_text(data: bytes | str, where: str) -> str:
    """Text from the user as valid Unicode. Bytes that are not UTF-8 (on stdin, or in an argument, which
    Python hands over with surrogate escapes) are each replaced by U+FFFD, with a warning on stderr: the rest
    of the text is still worth answering, and the warning says why a character came out as \ufffd."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"minigemma: warning: {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
              "invalid bytes were replaced by U+FFFD", file=sys.stderr)
        return data.decode("utf-8", "replace")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minigemma", description="A readable NumPy Gemma.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or answer it, with --chat)")
    g.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    add_model_flags(g)
    add_sampling_flags(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat format")
    g.add_argument("--system", default=None, help="with --chat: a system message, folded into the user turn")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence/end-of-turn")
    g.add_argument("--stats", action="store_true",
                   help="print timing and memory as one JSON line, the last line of stderr")
    g.set_defaults(run=generate_command)

    c = sub.add_parser("chat", help="talk with the model, turn by turn, keeping its cache")
    add_model_flags(c)
    add_sampling_flags(c)  # --max-new-tokens is per reply
    c.add_argument("--system", default=None, help="a system message, folded into the first user turn")
    c.add_argument("--stats", action="store_true", help="after each reply, one JSON line of counts and timing")
    c.set_defaults(run=chat_command)
    return parser


def generate_command(args) -> int:
    from .generate import Stats, chat_prompt, generate

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    sampling = sampling_from_args(args, ignore_eos=args.ignore_eos)
    if args.prompt == "-":
        prompt = as_text(sys.stdin.buffer.read(), "standard input")
    else:
        prompt = as_text(args.prompt, "the prompt")
    if args.chat:
        prompt = chat_prompt(prompt, system=as_text(args.system, "--system") if args.system else args.system)

    start = time.perf_counter()
    model = load_model(args)
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


CHAT_HELP = "/reset starts over, /system TEXT sets the system message (and starts over), /quit or Ctrl-D leaves"


@contextmanager
def sigint_as_flag():
    """While a reply is generated, Ctrl-C sets a flag instead of raising: the reply loop stops after the
    current model step, never inside one, so the cache always holds whole steps."""
    hit = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_command(args) -> int:
    from .chat import Conversation
    from .generate import Stats

    sampling = sampling_from_args(args)
    system = as_text(args.system, "--system") if args.system is not None else None
    try:
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    except ImportError:
        pass
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that aren't UTF-8 reach as_text, which says so
    model = load_model(args)
    conversation = Conversation(model, system=system)
    print(f"chatting with {model.source} ({CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            line = as_text(input("> "), "the input")
        except EOFError:  # Ctrl-D
            print()
            return 0
        command, _, rest = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            conversation.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if command == "/system":
            conversation.system = rest.strip() or None
            conversation.reset()
            print(f"(system message {'set' if rest.strip() else 'cleared'}; conversation reset)", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"unknown command {command} ({CHAT_HELP})", file=sys.stderr)
            continue
        if not line.strip():
            continue

        stats = Stats()
        context_before = conversation.cache.length
        try:
            with sigint_as_flag() as interrupted:
                for chunk in conversation.reply(line, sampling, stats):  # one chunk per token, maybe ""
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                    if interrupted:
                        stats.finish_reason = "interrupted"
                        break
        except ContextOverflow as e:
            print(f"minigemma: {e}: the conversation is too long; /reset to start a new one", file=sys.stderr)
            continue
        print()
        if stats.finish_reason == "interrupted":
            print("(interrupted)", file=sys.stderr)
        if stats.finish_reason == "context" or conversation.room() <= 0:
            print("(the conversation has filled the context window; /reset to start a new one)", file=sys.stderr)
        if args.stats:  # prompt_tokens: what this turn prefilled; cached_tokens: what it did not need to
            report = {**stats.as_dict(), "cached_tokens": context_before,
                      "conversation_tokens": len(conversation.tokens)}
            print(json.dumps(report), file=sys.stderr)


def report_error(e: BaseException) -> tuple[str, int]:
    """The one line to print for an error that ended the command, and the exit code."""
    if isinstance(e, UsageError):
        return f"error: {e} (see --help)", 2
    if isinstance(e, MinigemmaError):
        return f"error: {e}", 1
    if isinstance(e, MemoryError):  # file headers are checked before allocating, so this is really memory
        return f"error: out of memory ({e or 'MemoryError'}); try a smaller model or a shorter prompt", 1
    if isinstance(e, OSError):  # names the file: "[Errno 13] Permission denied: 'model.gguf'"
        return f"error: {e}", 1
    return f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # exits with code 2 and one line on bad flags
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays; nothing is half-written (we write no files)
        try:
            sys.stdout.flush()
        except OSError:
            pass
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. piped into `head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush can't fail again
        return 0
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        message, code = report_error(e)
        print(f"minigemma: {message}", file=sys.stderr)
        return code
