"""`python -m minigemma generate PROMPT`, `... chat`, `... perplexity FILE` and `... compare` (also installed as
`minigemma`).

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

from .errors import ContextOverflow, InvalidArgument, UsageError
from .weights import DTYPE_CHOICES, QUANTIZE_CHOICES


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


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --quantize, --dtype, --backend: which weights, stored how, run by which kernels (shared by every
    command that loads a model)."""
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    # The default stays the float32 reference: int8 needs 3.9x less memory, but on the README's second prompt
    # ("The capital of France is", 64 tokens) its greedy text parts from float32's (docs/quantization.md).
    p.add_argument("--quantize", default="none", choices=("none",) + QUANTIZE_CHOICES,
                   help="store the weight matrices as int8 or int4 (default: none, the float32 reference)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="store the weight matrices in 16 bits (or float32), instead of --quantize")
    # The command line is for using the model, so it runs the compiled kernels; minigemma.load() in a
    # notebook or a debugger gives the readable NumPy reference instead (kernels.py).
    p.add_argument("--backend", default="numba", choices=["numba", "numpy"],
                   help="kernels: numba (compiled, the default) or numpy (the readable reference); same answers")
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

    return load(args.model, **model_options(args))


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


def model_options(args) -> dict:
    """load() keywords from the model flags."""
    quantize = args.quantize
    if quantize != "none" and args.dtype not in (None, "float32"):
        raise UsageError(f"--quantize {quantize} and --dtype {args.dtype}: choose one")
    return {"quantize": None if quantize == "none" else quantize, "dtype": args.dtype, "backend": args.backend}


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

    p = sub.add_parser("perplexity", help="perplexity of a text, and (--compare-to) KL against other weights")
    p.add_argument("file", nargs="?", default=None,
                   help="a UTF-8 text file, or - for standard input (default: the Python Language Reference "
                        "topics that ship with Python, pydoc_data.topics)")
    add_model_flags(p)
    p.add_argument("--context", type=whole_number, default=512, help="tokens per window, <bos> included "
                   "(default: 512)")
    p.add_argument("--stride", type=whole_number, default=None,
                   help="tokens each window moves on by (default: half the context)")
    p.add_argument("--max-tokens", type=whole_number, default=None,
                   help="score only the first N tokens of the text (default: all)")
    p.add_argument("--compare-to", default=None, choices=("none",) + QUANTIZE_CHOICES + DTYPE_CHOICES,
                   help="also run the model with these weights (none = the float32 reference) and report mean "
                        "KL divergence and top-1 agreement against them")
    p.add_argument("--stats", action="store_true",
                   help="print the results and timing as one JSON line, the last line of stderr")
    p.set_defaults(run=perplexity_command)

    cmp = sub.add_parser("compare", help="compare every layer with transformers (needs transformers and torch)")
    cmp.add_argument("--model", default=None,
                     help="HF directory, Gemma 2/3 .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    cmp.add_argument("--prompt", default=DEFAULT_COMPARE_PROMPT,
                     help="the text both run on (default: a short sentence; see compare.py on long prompts)")
    cmp.set_defaults(run=compare_command)
    return parser


# Short on purpose: float32 noise grows with prompt length (compare.py, noise_threshold)
DEFAULT_COMPARE_PROMPT = "The capital of France is Paris. The capital of Germany is"


def compare_command(args) -> int:
    """Exit 0 when every step is within float32 noise, 1 when one departs (or anything fails)."""
    from .compare import compare, load_transformers_model, require_transformers
    from .loading import load

    require_transformers()
    model = load(args.model)
    hf_model = load_transformers_model(model)
    ids = model.tokenizer.encode(args.prompt, add_bos=True)
    report = compare(model, hf_model, ids)
    print(f"{model.source}: {len(ids)} tokens")
    print(report.format(lambda i: model.tokenizer.decode([i])))
    return 0 if report.first_departure is None else 1


def generate_command(args) -> int:
    from .generate import Stats, chat_prompt, generate
    from .loading import load

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    sampling = sampling_from_args(args, ignore_eos=args.ignore_eos)
    if args.prompt == "-":
        prompt = as_text(sys.stdin.buffer.read(), "standard input")
    else:
        prompt = as_text(args.prompt, "the prompt")
    if args.chat:
        prompt = chat_prompt(prompt, system=as_text(args.system, "--system") if args.system else args.system)

    options = model_options(args)
    start = time.perf_counter()
    model = load(args.model, **options)
    load_s = time.perf_counter() - start
    ids = model.tokenizer.encode(prompt, add_bos=True)

    stats = Stats()
    first_token_s = None
    for chunk in generate(model, ids, sampling, stats):
        if first_token_s is None:
            first_token_s = time.perf_counter() - start
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        report = {**stats.as_dict(), "load_s": round(load_s, 3),
                  # from the start of loading to the first text shown: what a user waits for
                  "time_to_first_token_s": None if first_token_s is None else round(first_token_s, 3),
                  "weight_bytes": model.nbytes, "quantize": options["quantize"],
                  "dtype": options["dtype"] or "float32", "backend": model.backend.name,
                  "peak_rss_mb": round(peak_mb, 1)}
        print(json.dumps(report), file=sys.stderr)
    return 0


def perplexity_command(args) -> int:
    from tqdm import tqdm

    from .loading import load
    from .perplexity import perplexity, reference_text

    options = model_options(args)
    compare = None
    if args.compare_to is not None:  # the reference runs on the same backend, so only the weights differ
        compare = ({"quantize": None, "dtype": None} if args.compare_to == "none" else
                   {"quantize": args.compare_to, "dtype": None} if args.compare_to in QUANTIZE_CHOICES else
                   {"quantize": None, "dtype": args.compare_to})
        compare["backend"] = options["backend"]
    if args.file is None:
        text, name = reference_text(), "pydoc_data.topics"
    elif args.file == "-":
        text, name = as_text(sys.stdin.buffer.read(), "standard input"), "<stdin>"
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text, name = f.read(), args.file
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    start = time.perf_counter()
    model = load(args.model, **options)
    reference = load(args.model, **compare) if compare is not None else None
    load_s = time.perf_counter() - start
    ids = model.tokenizer.encode(text, add_bos=False)[:args.max_tokens]
    if not ids:
        raise InvalidArgument(f"{name}: no text to score")

    start = time.perf_counter()
    with tqdm(total=len(ids), desc="scoring", unit="tok", disable=not sys.stderr.isatty(), leave=False) as bar:
        result = perplexity(model, ids, context=args.context, stride=args.stride, reference=reference,
                            progress=bar.update)
    seconds = time.perf_counter() - start

    line = f"{name}: {result.tokens} tokens, perplexity {result.perplexity:.4f}"
    if reference is not None:
        r = result.as_dict()
        line += f"; against {args.compare_to}: mean KL {r['mean_kl']:.6f}, top-1 agreement {r['top1_agreement']:.2%}"
    print(line)
    if args.stats:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = {**result.as_dict(), "text": name, "context": args.context,
                  "stride": args.stride or args.context // 2, "quantize": options["quantize"],
                  "dtype": options["dtype"] or "float32", "compare_to": args.compare_to,
                  "backend": model.backend.name, "weight_bytes": model.nbytes, "load_s": round(load_s, 3),
                  "score_s": round(seconds, 3),
                  "peak_rss_mb": round(peak_mb, 1)}
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
    if isinstance(e, MemoryError):  # file headers are checked before allocating, so this is really memory
        return f"error: out of memory ({e or 'MemoryError'}); try a smaller model or a shorter prompt", 1
    if isinstance(e, (ValueError, OSError)):  # MinigemmaError is a ValueError; OSError names the file
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
