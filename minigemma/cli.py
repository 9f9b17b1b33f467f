"""`python -m minigemma generate PROMPT`, `... chat`, `... perplexity FILE`, `... compare`, `... tokenize TEXT`,
`... finetune TRAIN.jsonl` and `... merge` (also installed as `minigemma`).

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
from .tokenizer import ENCODERS
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


def add_model_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """--model, --quantize, --dtype, --backend (and --adapter): which weights, stored how, run by which kernels
    (shared by every command that loads a model)."""
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file or HF repo id (default: the built-in Gemma 3 270M)")
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="a PEFT LoRA adapter folder to apply (made by `finetune` or by peft)")
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
    options = {"quantize": None if quantize == "none" else quantize, "dtype": args.dtype, "backend": args.backend}
    if getattr(args, "adapter", None) is not None:
        options["adapter"] = args.adapter
    return options


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
                   help="also run the model with these weights (none = the float32 reference; never with "
                        "--adapter, so `--adapter DIR --compare-to none` measures what the adapter changed) and "
                        "report mean KL divergence and top-1 agreement against them")
    p.add_argument("--stats", action="store_true",
                   help="print the results and timing as one JSON line, the last line of stderr")
    p.set_defaults(run=perplexity_command)

    t = sub.add_parser("tokenize", help="print a text's token ids as a JSON list (like llama.cpp's llama-tokenize)")
    t.add_argument("text", help="the text, or - to read it from standard input (all of it, a final newline too)")
    t.add_argument("--model", default=None,
                   help="a .gguf file, an HF directory or its tokenizer.model, or an HF repo id (default: the "
                        "built-in Gemma 3 270M); only the tokenizer is read")
    t.add_argument("--encoder", default="sentencepiece", choices=ENCODERS,
                   help="who merges: sentencepiece (the C++ library, default) or python (the readable "
                        "reference, tokenizer.PythonBPE, ~10x slower); same ids")
    t.add_argument("--pieces", action="store_true", help="print the pieces (\u2581 for a space) instead of the ids")
    t.add_argument("--no-bos", action="store_true", help="do not put <bos> in front")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the Python traceback")
    t.set_defaults(run=tokenize_command)

    add_finetune_parser(sub)

    m = sub.add_parser("merge", help="fold a LoRA adapter into the model and write a Hugging Face directory")
    add_model_flags(m)
    m.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must be empty or absent)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    m.set_defaults(run=merge_command)

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


def tokenize_command(args) -> int:
    from .loading import load_tokenizer

    text = as_text(sys.stdin.buffer.read(), "standard input") if args.text == "-" else as_text(args.text, "the text")
    tokenizer = load_tokenizer(args.model, encoder=args.encoder)
    ids = tokenizer.encode(text, add_bos=not args.no_bos)
    print(json.dumps([tokenizer.id_to_piece(i) for i in ids], ensure_ascii=False) if args.pieces else json.dumps(ids))
    return 0


def generate_command(args) -> int:
    from .generate import Stats, chat_prompt, generate
    from .kvcache import kv_cache_bytes
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
                  # keys and values held at the end (Gemma 4: per-layer shapes, shared layers hold none)
                  "kv_cache_bytes": kv_cache_bytes(model.config, stats.prompt_tokens + stats.generated_tokens),
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


def add_finetune_parser(sub) -> None:
    from .finetune import Settings
    from .optim import OPTIMIZERS, SCHEDULES

    d = Settings()
    f = sub.add_parser("finetune", help="train a LoRA adapter (or, with --full, every weight) on a JSONL file",
                       description="Fine-tune on TRL-style JSONL: {\"text\"}, {\"prompt\", \"completion\"} or "
                                   "{\"messages\"} per line. Writes a PEFT adapter (or, with --full, a Hugging Face "
                                   "directory) to --out, with a checkpoint that --resume continues and a loss curve.")
    f.add_argument("train_file", metavar="TRAIN.jsonl")
    f.add_argument("--out", default=None, metavar="DIR", help="output folder (must be empty or absent)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    f.add_argument("--eval", default=None, metavar="FILE", help="held-out JSONL, scored every --eval-every steps "
                   "and at the end")
    f.add_argument("--eval-every", type=whole_number, default=d.eval_every, metavar="N",
                   help="steps between evaluations (default: 0, only at the end)")
    add_model_flags(f, adapter=False)
    f.add_argument("--lora-rank", type=positive_int, default=d.rank, help=f"default: {d.rank}")
    f.add_argument("--lora-alpha", type=finite_number, default=d.alpha, help="the update is scaled by alpha / rank "
                   f"(default: {d.alpha:g})")
    f.add_argument("--lora-dropout", type=finite_number, default=d.dropout, help="default: 0")
    f.add_argument("--target-modules", default="all", metavar="q,k,v,o,gate,up,down",
                   help="the matrices that get adapters (default: all seven)")
    f.add_argument("--full", action="store_true", help="train every weight (float32 only); writes an HF directory")
    length = f.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=finite_number, default=None, help="passes over the data (default: 1)")
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (instead of --epochs)")
    f.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"default: {d.batch_size}")
    f.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step (default: 1)")
    f.add_argument("--max-length", type=positive_int, default=d.max_length,
                   help=f"tokens per example; longer ones are cut (default: {d.max_length})")
    f.add_argument("--lr", type=finite_number, default=None,
                   help=f"peak learning rate (default: {d.lr:g} for LoRA, {FULL_LR:g} with --full)")
    f.add_argument("--warmup", type=whole_number, default=d.warmup, help="steps of linear warmup (default: 0)")
    f.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"after warmup (default: {d.schedule})")
    f.add_argument("--weight-decay", type=finite_number, default=d.weight_decay, help="decoupled (default: 0)")
    f.add_argument("--max-grad-norm", type=finite_number, default=d.max_grad_norm,
                   help=f"clip the global gradient norm to this; 0 disables (default: {d.max_grad_norm:g})")
    f.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"default: {d.optimizer}")
    f.add_argument("--seed", type=whole_number, default=d.seed, help="shuffling, adapter init and dropout "
                   "(default: 0): the same seed gives the same run")
    f.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in the backward: less memory, "
                        "~1/3 more time")
    f.add_argument("--init-adapter", default=None, metavar="DIR", help="start from this PEFT adapter instead of a "
                   "fresh one")
    f.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR (by Ctrl-C or at its end); its settings are used, and "
                        "--steps may extend it")
    f.add_argument("--stats", action="store_true", help="print timing and memory as one JSON line, the last "
                   "line of stderr")
    f.set_defaults(run=finetune_command)


FULL_LR = 2e-5  # full fine-tuning moves every weight, so a tenth of LoRA's rate (docs/training.md)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def settings_from_args(args, options: dict):
    """The run's finetune.Settings from the flags; a bad value is a usage error, found before the slow load."""
    from . import finetune as ft
    from .lora import parse_targets

    if args.full and (options["quantize"] or options["dtype"] not in (None, "float32")):
        raise UsageError("--full trains float32 weights: drop --quantize/--dtype (or train LoRA on them: QLoRA)")
    if args.full and args.init_adapter:
        raise UsageError("--init-adapter is for LoRA, not --full")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-dropout {args.lora_dropout}: expected a probability in [0, 1)")
    for flag, value, ok, expected in (
            ("--lr", args.lr, args.lr is None or args.lr > 0, "a positive number"),
            ("--lora-alpha", args.lora_alpha, args.lora_alpha > 0, "a positive number"),
            ("--epochs", args.epochs, args.epochs is None or args.epochs > 0, "a positive number"),
            ("--max-grad-norm", args.max_grad_norm, args.max_grad_norm >= 0, "a number >= 0 (0: no clipping)"),
            ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "a number >= 0")):
        if not ok:
            raise UsageError(f"{flag} {value:g}: expected {expected}")
    try:
        targets = parse_targets(args.target_modules)
    except InvalidArgument as e:
        raise UsageError(f"--target-modules: {e}") from None
    return ft.Settings(
        full=args.full, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
        steps=args.steps, epochs=args.epochs if args.epochs is not None else 1.0, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length,
        lr=args.lr if args.lr is not None else (FULL_LR if args.full else ft.Settings.lr), warmup=args.warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        optimizer=args.optimizer, seed=args.seed, eval_every=args.eval_every,
        gradient_checkpointing=args.gradient_checkpointing)


def finetune_command(args) -> int:
    from pathlib import Path

    from . import finetune as ft
    from .data import load_examples
    from .loading import load

    if args.resume is None and args.out is None:
        raise UsageError("finetune needs --out DIR (or --resume DIR)")
    state = ft.read_state(args.resume) if args.resume is not None else None
    out = Path(args.out if args.out is not None else args.resume)
    overwrite = args.overwrite or (args.resume is not None and out.resolve() == Path(args.resume).resolve())
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UsageError(f"--out {out}: the folder is not empty (pass --overwrite to replace it)")
    if state is not None:  # the checkpoint's settings and model, so the continued run is the same run
        settings, options = state["settings"], dict(state["model_options"])
        if args.steps is not None:
            settings.steps = args.steps
        source = args.resume if settings.full else options.pop("model")
        options.pop("model", None)
    else:
        options = model_options(args)
        settings = settings_from_args(args, options)
        source = args.model

    start = time.perf_counter()
    model = load(source, **options)
    load_s = time.perf_counter() - start
    examples, cut = load_examples(args.train_file, model.tokenizer, settings.max_length)
    if cut:
        print(f"minigemma: {cut} of {len(examples)} examples in {args.train_file} were longer than --max-length "
              f"{settings.max_length} tokens and were cut", file=sys.stderr)
    eval_examples = None
    if args.eval is not None:
        eval_examples, eval_cut = load_examples(args.eval, model.tokenizer, settings.max_length)
        if eval_cut:
            print(f"minigemma: {eval_cut} of {len(eval_examples)} examples in {args.eval} were cut to "
                  f"{settings.max_length} tokens", file=sys.stderr)
    digest = ft.sha256(args.train_file)
    if state is not None:
        if digest != state["data_sha256"]:
            raise InvalidArgument(f"{args.train_file}: not the data the checkpoint in {args.resume} was trained on "
                                  "(its sha256 differs)")
        run = ft.resume(model, args.resume, state)
        run.total = settings.total_steps(len(examples))
    else:
        run = ft.start(model, settings, len(examples), args.init_adapter)
        run.data_sha256 = digest
    saved_options = {"model": model.source if state is None else state["model_options"].get("model"), **options}
    saved_options.pop("adapter", None)
    pad = model.tokenizer.pad_id if model.tokenizer.pad_id >= 0 else model.tokenizer.eos_id
    trainable = sum(a.size for a in run.params.values())
    print(f"minigemma: training {trainable:,} weights ({settings.train}) on {len(examples)} examples, "
          f"steps {run.step + 1}..{run.total}", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=run.total, initial=run.step, desc="finetune", unit="step", leave=True) \
        if sys.stderr.isatty() else None
    try:
        with sigint_as_flag() as interrupted:
            finished = ft.fit(run, examples, pad, eval_examples, should_stop=lambda: bool(interrupted),
                              report=ft.report_to(sys.stderr, run.total, run.step, bar))
    finally:
        if bar is not None:
            bar.close()
    ft.save(run, out, saved_options, overwrite=True)
    picture = "loss.png" if (out / "loss.png").exists() else "loss.csv (matplotlib is not installed: no picture)"
    if not finished:
        print(f"minigemma: interrupted after step {run.step} of {run.total}; checkpoint saved in {out}; continue "
              f"with: python -m minigemma finetune {args.train_file} --resume {out}", file=sys.stderr)
        return 130
    last = run.history[-1]
    what = "Hugging Face directory" if settings.full else "adapter"
    print(f"minigemma: {what} saved in {out} (loss {last['loss']:.4f}"
          + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "") + f"; curve: {picture})",
          file=sys.stderr)
    if args.stats:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = {"steps": run.step, "examples": len(examples), "examples_cut": cut, "trainable": int(trainable),
                  "scored_tokens": run.tokens, "train_tokens": run.input_tokens, "train_s": round(run.seconds, 3),
                  "tokens_per_s": round(run.input_tokens / run.seconds, 1) if run.seconds else None,
                  "loss": last["loss"], "eval_loss": last.get("eval_loss"), "load_s": round(load_s, 3),
                  "backend": model.backend.name, "peak_rss_mb": round(peak_mb, 1)}
        print(json.dumps(report), file=sys.stderr)
    return 0


def merge_command(args) -> int:
    from .lora import save_merged

    if args.adapter is None:
        raise UsageError("merge needs --adapter DIR (the adapter to fold in)")
    model = load_model(args)
    out = save_merged(model, args.out, overwrite=args.overwrite)
    print(f"minigemma: wrote {out} (config.json, model.safetensors"
          + (", tokenizer.model" if (out / "tokenizer.model").exists() else "") + ")", file=sys.stderr)
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
    except KeyboardInterrupt:  # Ctrl-C: what was printed stays; nothing is half-written (folders are written
        # whole and renamed into place; finetune catches its Ctrl-C itself, to save a checkpoint first)
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
