"""The fine-tuning loop: batches -> loss and gradients (train.py) -> clip -> optimizer step, with evaluation,
checkpoints that resume exactly, and a loss curve.

One optimizer step:

    for a in range(grad_accum):                     micro-batch k = step * grad_accum + a
        tokens, labels = collate(micro_batch(examples, k, batch_size, seed))
        loss_k, count_k, grads_k = loss_and_grads(model, tokens, labels, ...)
    loss = sum(loss_k) / sum(count_k); grads = sum(grads_k) / sum(count_k)     (mean over all scored tokens)
    clip_grad_norm(grads, max_grad_norm); optimizer.step(grads, learning_rate(step, ...))

Dividing by the tokens of the whole step (not averaging micro-batch means) makes accumulation exact: 4
micro-batches of 2 give the step that one batch of 8 would.

Everything random is a function of (seed, micro-batch k): the order of the examples in each epoch (data.py)
and the LoRA dropout masks. So the checkpoint's "RNG state" is the seed and the step, and a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes (the optimizer's moments are saved with it).
A --full checkpoint's weights are its HF directory, except Gemma 4's norm gains: minigemma trains w - 1, the
file holds the gain w, and float32(w - 1 + 1) loses the low bits of a small w - 1; so they are saved as trained
too, and a resumed run starts from the very weights the uninterrupted run had.

The output folder (written whole, then renamed into place: lora.new_directory):
    adapter_config.json, adapter_model.safetensors     the PEFT adapter (LoRA), or
    config.json, model.safetensors, tokenizer.model    a Hugging Face directory (--full)
    trainer_state.json                                  settings, step, the loss history, the data's sha256
    optimizer.safetensors                               AdamW's moments and step count
    norms.safetensors                                   Gemma 4 --full: the norm gains exactly as trained (above)
    loss.csv, loss.png                                  the loss curve (the picture needs matplotlib)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import train as training
from .data import Example, collate, micro_batch, micro_batches_per_epoch
from .errors import InvalidArgument, ModelFileError
from .lora import DEFAULT_TARGETS, add_adapters, load_adapter, new_directory, write_adapter, write_hf_directory
from .optim import clip_grad_norm, learning_rate, make_optimizer

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
NORMS = "norms.safetensors"


@dataclass
class Settings:
    """What a run does. The defaults are the command line's (docs/training.md says why)."""

    full: bool = False  # train every parameter (float32 models) instead of LoRA adapters
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha: the update is scaled by alpha / r = 2
    dropout: float = 0.0  # LoRA dropout on each adapter's input
    targets: tuple[str, ...] = DEFAULT_TARGETS  # which matrices get adapters
    steps: int | None = None  # optimizer steps; None: from epochs
    epochs: float = 1.0
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 512  # tokens per example, longer ones are cut
    lr: float = 2e-4  # peak learning rate
    warmup: int = 0  # steps of linear warmup
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"
    seed: int = 0
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    gradient_checkpointing: bool = False  # recompute each block in the backward instead of keeping it

    @property
    def train(self) -> str:
        return "full" if self.full else "lora"

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        micro = math.ceil(self.epochs * micro_batches_per_epoch(n_examples, self.batch_size))
        return max(1, math.ceil(micro / self.grad_accum))


@dataclass
class Run:
    """A run in progress: the model (trained in place), its optimizer, where it is, what it has seen."""

    model: object
    settings: Settings
    optimizer: object
    params: dict[str, np.ndarray]  # the trainable arrays, views into model.params
    total: int  # optimizer steps of the whole run
    step: int = 0  # optimizer steps done
    history: list[dict] = dataclasses.field(default_factory=list)  # one row per step (and eval)
    data_sha256: str = ""
    seconds: float = 0.0  # training time so far (over every resumed part)
    tokens: int = 0  # scored tokens so far
    input_tokens: int = 0  # tokens run through the model so far (without padding)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def own_weights(params) -> None:
    """Give the model writable copies of its float32 arrays, for full fine-tuning. Loading views float32 tensors
    straight in the memory-mapped file (hf.py), read-only: training them in place must not write the file.
    Every field, the model-level ones (Gemma 4's per-layer embeddings too) and each of Gemma 4's experts (a
    list of matrices, each a view into the file's stacked tensor)."""
    def own(w):
        if isinstance(w, list):
            return [own(m) for m in w]
        return np.array(w) if isinstance(w, np.ndarray) and not w.flags.writeable else w

    for name, w in vars(params).items():
        if name != "layers":
            setattr(params, name, own(w))
    for layer in params.layers:
        for name, w in vars(layer).items():
            setattr(layer, name, own(w))


def start(model, settings: Settings, n_examples: int, init_adapter: str | Path | None = None) -> Run:
    """Prepare a fresh run: adapters (new, or from --init-adapter) unless full, and the optimizer."""
    if settings.full:
        if init_adapter is not None:
            raise InvalidArgument("--init-adapter is for LoRA; --full trains the model's own weights")
        own_weights(model.params)
    elif init_adapter is not None:
        load_adapter(model, init_adapter)
    else:
        add_adapters(model, settings.rank, settings.alpha, settings.targets, settings.seed)
    params = training.parameters(model, settings.train)
    optimizer = make_optimizer(settings.optimizer, params, settings.weight_decay)
    return Run(model, settings, optimizer, params, settings.total_steps(n_examples))


def train_step(run: Run, examples: list[Example], pad_id: int) -> dict:
    """One optimizer step over grad_accum micro-batches; returns its row of the history."""
    s = run.settings
    total_loss, total_count, grads, seen = 0.0, 0, None, 0
    for a in range(s.grad_accum):
        k = run.step * s.grad_accum + a
        batch = micro_batch(examples, k, s.batch_size, s.seed)
        seen += sum(len(e.ids) for e in batch)
        tokens, labels = collate(batch, pad_id)
        rng = np.random.default_rng([s.seed, k, 1]) if s.dropout > 0 else None  # dropout masks of micro-batch k
        loss_sum, count, g = training.loss_and_grads(run.model, tokens, labels, s.train,
                                                     checkpoint=s.gradient_checkpointing, dropout=s.dropout,
                                                     rng=rng)
        total_loss += loss_sum
        total_count += count
        if grads is None:
            grads = g
        else:
            for name in grads:
                grads[name] += g[name]
    scale = np.float32(1.0 / max(total_count, 1))
    for g in grads.values():
        g *= scale  # the gradient of the mean over every scored token of the step
    norm = clip_grad_norm(grads, s.max_grad_norm)
    lr = learning_rate(run.step, s.lr, run.total, s.warmup, s.schedule)
    run.optimizer.step(grads, lr)
    run.step += 1
    run.tokens += total_count
    run.input_tokens += seen
    row = {"step": run.step, "loss": total_loss / max(total_count, 1), "lr": lr, "grad_norm": norm,
           "tokens": total_count, "input_tokens": seen}  # scored tokens; tokens run through (padding not counted)
    run.history.append(row)
    return row


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean loss per scored token over the examples, in file order."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        tokens, labels = collate(examples[i:i + batch_size], pad_id)
        loss_sum, n = training.loss(model, tokens, labels)
        total, count = total + loss_sum, count + n
    return total / max(count, 1)


def fit(run: Run, examples: list[Example], pad_id: int, eval_examples: list[Example] | None = None,
        should_stop: Callable[[], bool] = lambda: False, report: Callable[[dict], None] = lambda row: None) -> bool:
    """Step until the run's total, evaluating every `eval_every` steps and at the end. Returns False if
    `should_stop` asked to stop early (checked between steps, so the model is always at a whole step)."""
    s = run.settings
    if eval_examples and not run.history:  # where the model starts: the baseline the curve is read against
        row = {"step": 0, "eval_loss": evaluate(run.model, eval_examples, s.batch_size, pad_id)}
        run.history.append(row)
        report(row)
    while run.step < run.total:
        t0 = time.perf_counter()
        row = train_step(run, examples, pad_id)
        last = run.step == run.total
        if eval_examples and (last or (s.eval_every and run.step % s.eval_every == 0)):
            row["eval_loss"] = evaluate(run.model, eval_examples, s.batch_size, pad_id)
        run.seconds += time.perf_counter() - t0
        row["seconds"] = run.seconds
        report(row)
        if not last and should_stop():
            return False
    return True


# ---- saving and resuming ---------------------------------------------------------------------------------

def save(run: Run, out: str | Path, model_options: dict | None = None, overwrite: bool = True) -> Path:
    """Write the run's output folder whole (adapter or HF directory, state, optimizer, curve)."""
    from safetensors.numpy import save_file

    model, s = run.model, run.settings
    with new_directory(out, overwrite) as tmp:
        if s.full:
            write_hf_directory(tmp, model.config, model.params, model._tokenizer, model.source)
        else:
            write_adapter(tmp, model.params, model.source, s.dropout)
        save_file({k: np.ascontiguousarray(v) for k, v in run.optimizer.state().items()}, str(tmp / OPTIMIZER))
        if s.full and model.config.norm_gain_is_w:
            save_file(_norm_gains(run.params), str(tmp / NORMS))
        state = {"step": run.step, "total_steps": run.total, "settings": dataclasses.asdict(s),
                 "model": model.source, "model_options": model_options or {}, "data_sha256": run.data_sha256,
                 "seconds": run.seconds, "tokens": run.tokens, "input_tokens": run.input_tokens,
                 "history": run.history}
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        write_curve(tmp, run.history)
    return Path(out)


def read_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE
    if not path.is_file():
        raise ModelFileError(f"{directory}: not a minigemma fine-tuning checkpoint (no {STATE})")
    try:
        state = json.loads(path.read_text())
        state["settings"]["targets"] = tuple(state["settings"]["targets"])
        state["settings"] = Settings(**state["settings"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    return state


def resume(model, directory: str | Path, state: dict) -> Run:
    """The run saved in `directory`, continued on `model` (freshly loaded from the same source: for --full,
    the directory itself, whose weights are the trained ones)."""
    from safetensors.numpy import load_file

    s: Settings = state["settings"]
    if s.full:
        own_weights(model.params)
    else:
        load_adapter(model, directory)
    params = training.parameters(model, s.train)
    optimizer = make_optimizer(s.optimizer, params, s.weight_decay)
    try:  # the safetensors library checks the file (no pickle); int64 "t" is a tensor minigemma's reader refuses
        optimizer.load_state(load_file(str(Path(directory) / OPTIMIZER)))
    except Exception as e:  # OSError, KeyError, safetensors' own SafetensorError
        raise ModelFileError(f"{Path(directory) / OPTIMIZER}: cannot restore the optimizer ({type(e).__name__}: "
                             f"{e})") from None
    if s.full and (Path(directory) / NORMS).is_file():
        _restore_norm_gains(params, Path(directory) / NORMS)
    return Run(model, s, optimizer, params, state["total_steps"], state["step"], state["history"],
               state["data_sha256"], state["seconds"], state["tokens"], state.get("input_tokens", 0))


def _norm_gains(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The norm gains among the trainable arrays ("layers.3.q_norm", "final_norm", ...), as minigemma holds them."""
    return {name: np.ascontiguousarray(w) for name, w in params.items() if name.rsplit(".", 1)[-1].endswith("_norm")}


def _restore_norm_gains(params: dict[str, np.ndarray], path: Path) -> None:
    """Put the saved norm gains back over those read from the HF file (module docstring), checked first."""
    from safetensors.numpy import load_file

    try:
        saved = load_file(str(path))
    except Exception as e:  # OSError, safetensors' own SafetensorError
        raise ModelFileError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    expected = _norm_gains(params)
    for name, w in saved.items():
        if name not in expected or w.shape != expected[name].shape:
            raise ModelFileError(f"{path}: tensor {name} {w.shape} is not a norm gain of this model")
    for name, w in saved.items():
        params[name][...] = w


def write_curve(directory: Path, history: list[dict]) -> str:
    """loss.csv always; loss.png too when matplotlib is installed (a dev dependency). Returns what was written."""
    with open(directory / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "eval_loss", "lr", "grad_norm", "tokens"])
        for r in history:  # the step-0 row (the baseline evaluation) has only an eval_loss
            w.writerow([r["step"]] + [f"{r[k]:.6g}" if k in r else "" for k in ("loss", "eval_loss", "lr", "grad_norm")]
                       + [r.get("tokens", "")])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss.csv"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    trained = [r for r in history if "loss" in r]
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], label="train", lw=1)
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "loss.png", dpi=100)
    plt.close(fig)
    return "loss.png"


def progress_line(row: dict, total: int, tokens_per_s: float, seconds_left: float) -> str:
    text = f"step {row['step']}/{total} loss {row['loss']:.4f}"
    if "eval_loss" in row:
        text += f" eval {row['eval_loss']:.4f}"
    return text + f" lr {row['lr']:.3g} {tokens_per_s:.0f} tok/s {seconds_left:.0f}s left"


def report_to(stream=sys.stderr, total: int = 0, start_step: int = 0, bar=None):
    """A report(row) callback: the tqdm bar's postfix when there is a bar, else a line per step (at most ~20
    lines for a long run, plus every evaluation)."""
    every = max(1, total // 20)
    t_start, tok = time.perf_counter(), [0]

    def report(row):
        if "loss" not in row:  # the baseline evaluation, before the first step
            (bar.write if bar is not None else lambda t: print(t, file=stream, flush=True))(
                f"step 0/{total} eval {row['eval_loss']:.4f}")
            return
        tok[0] += row["input_tokens"]  # tokens/s: every token the model ran forward and backward
        elapsed = time.perf_counter() - t_start
        rate = tok[0] / elapsed if elapsed else 0.0
        left = elapsed / max(1, row["step"] - start_step) * (total - row["step"])
        if bar is not None:
            bar.set_postfix_str(f"loss {row['loss']:.4f}" + (f" eval {row['eval_loss']:.4f}" if "eval_loss" in row
                                                              else "") + f" {rate:.0f} tok/s", refresh=False)
            bar.update(1)
        elif row["step"] % every == 0 or row["step"] == total or "eval_loss" in row or row["step"] == start_step + 1:
            print(progress_line(row, total, rate, left), file=stream, flush=True)
    return report
