"""`python -m minigemma generate PROMPT`, `perplexity FILE` and `compare` (also installed as `minigemma`).

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

from .weights import DTYPE_CHOICES, QUANTIZE_CHOICES


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


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --quantize, --dtype: which weights, stored how (shared by every command that loads a model)."""
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    p.add_argument("--quantize", default="auto", choices=("auto", "none") + QUANTIZE_CHOICES,
                   help="store the weight matrices as int8 or int4; auto (default): int8 for a .gguf file "
                        "(already quantized, and 3x less memory than float32), none for a directory")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="store the weight matrices in 16 bits (or float32), instead of --quantize")


def model_options(args) -> dict:
    """load() keywords from the model flags. auto: int8 for GGUF files, unless --dtype is given."""
    quantize = args.quantize
    if quantize == "auto":
        is_gguf = args.model is None or str(args.model).endswith(".gguf")
        quantize = "int8" if is_gguf and args.dtype is None else "none"
    elif quantize != "none" and args.dtype not in (None, "float32"):
        raise UsageError(f"--quantize {quantize} and --dtype {args.dtype}: choose one")
    return {"quantize": None if quantize == "none" else quantize, "dtype": args.dtype}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigemma", description="A readable NumPy Gemma.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt (or answer it, with --chat)")
    g.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    add_model_flags(g)
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
    g.add_argument("--stats", action="store_true",
                   help="print timing and memory as one JSON line, the last line of stderr")

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

    cmp = sub.add_parser("compare", help="compare every layer with transformers (needs transformers and torch)")
    cmp.add_argument("--model", default=None,
                     help="HF directory, Gemma 2/3 .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    cmp.add_argument("--prompt", default=DEFAULT_COMPARE_PROMPT,
                     help="the text both run on (default: a short sentence; see compare.py on long prompts)")
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
                  "dtype": options["dtype"] or "float32", "peak_rss_mb": round(peak_mb, 1)}
        print(json.dumps(report), file=sys.stderr)
    return 0


def perplexity_command(args) -> int:
    from tqdm import tqdm

    from .loading import load
    from .perplexity import perplexity, reference_text

    options = model_options(args)
    compare = None
    if args.compare_to is not None:
        compare = ({"quantize": None, "dtype": None} if args.compare_to == "none" else
                   {"quantize": args.compare_to, "dtype": None} if args.compare_to in QUANTIZE_CHOICES else
                   {"quantize": None, "dtype": args.compare_to})
    if args.file is None:
        text, name = reference_text(), "pydoc_data.topics"
    elif args.file == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text, name = f.read(), args.file
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    start = time.perf_counter()
    model = load(args.model, **options)
    reference = load(args.model, **compare) if compare is not None else None
    load_s = time.perf_counter() - start
    ids = model.tokenizer.encode(text, add_bos=False)[:args.max_tokens]
    if not ids:
        raise ValueError(f"{name}: no text to score")

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
                  "weight_bytes": model.nbytes, "load_s": round(load_s, 3), "score_s": round(seconds, 3),
                  "peak_rss_mb": round(peak_mb, 1)}
        print(json.dumps(report), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with code 2 and a usage line on bad flags
    try:
        commands = {"generate": generate_command, "perplexity": perplexity_command, "compare": compare_command}
        return commands[args.command](args)
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
