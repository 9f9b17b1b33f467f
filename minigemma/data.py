"""Training data: JSONL in the formats TRL's SFTTrainer reads, tokenized with a loss mask, batched.

One JSON object per line, in one of three shapes (all lines of a file need not agree):

    {"text": "..."}                                   language modelling: loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only
    {"messages": [{"role": "user", "content": ...},   Gemma's chat format, loss on the assistant turns only
                  {"role": "assistant", "content": ...}, ...]}

Each example becomes (ids, labels): labels are the ids, with -100 wherever no loss is taken (transformers'
ignore_index); the model's logits at position t are scored against labels[t + 1] (train.loss_and_grads).

Tokenized as TRL's SFTTrainer does (trl `trainer/sft_trainer.py`, `_tokenize`): <bos> first, <eos> appended;
for prompt/completion, the prompt and prompt + completion are tokenized separately and the loss starts after
the prompt's tokens, `completion_mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))`. For
messages, each turn is written in Gemma's chat format (generate.chat_prompt, which folds a system message into
the first user turn) and the loss covers each assistant reply and its closing <end_of_turn>, so the model
learns both what to say and when to stop; the "\\n" after it and every user turn are not scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

IGNORE = -100


@dataclass
class Example:
    ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, IGNORE where there is no loss

    @property
    def targets(self) -> int:
        """Tokens this example is scored on (labels[0] is never a target: nothing predicts it)."""
        return int((self.labels[1:] != IGNORE).sum())


class DataError(InvalidArgument):
    """A training file that is not what it should be: names the file and line."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: no examples (expected one JSON object per line)")
    return rows


def tokenize(row: dict, tokenizer, where: str = "") -> Example:
    """One JSONL object -> Example, by its fields (see the module docstring)."""
    def text_field(key):
        value = row[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return value

    eos = tokenizer.eos_id
    if "messages" in row:
        return _messages(row["messages"], tokenizer, where)
    if "prompt" in row or "completion" in row:
        if not ("prompt" in row and "completion" in row):
            missing = "completion" if "prompt" in row else "prompt"
            raise DataError(f"{where}: has {'prompt' if missing == 'completion' else 'completion'} but no "
                            f"{missing!r}")
        prompt, completion = text_field("prompt"), text_field("completion")
        if not completion.strip():
            raise DataError(f"{where}: the completion is empty (nothing to learn from)")
        prompt_ids = tokenizer.encode(prompt, add_bos=True)
        ids = tokenizer.encode(prompt + completion, add_bos=True) + [eos]
        labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
        return _example(ids, labels)
    if "text" in row:
        text = text_field("text")
        if not text.strip():
            raise DataError(f"{where}: the text is empty")
        ids = tokenizer.encode(text, add_bos=True) + [eos]
        return _example(ids, list(ids))
    raise DataError(f"{where}: expected a \"text\", \"prompt\" and \"completion\", or \"messages\" field, got "
                    f"{', '.join(map(repr, row)) or 'none'}")


def _messages(messages, tokenizer, where: str) -> Example:
    """Gemma's chat format a turn at a time, scoring only the assistant's content and its <end_of_turn>.

    Each piece is encoded separately and the ids concatenated. With Gemma's vocabulary that is exactly the
    tokenization of the whole text: every boundary falls next to a special piece (<start_of_turn>,
    <end_of_turn>, "\\n"), which the tokenizer cuts out before its BPE runs anyway (tokenizer.py)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        "with string values")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    for i, m in enumerate(messages):  # Gemma has only user and model turns, alternating (chat_prompt)
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        if role != ("user" if i % 2 == 0 else "model"):
            raise DataError(f"{where}: message {i} has role {m['role']!r}: roles must alternate user/assistant, "
                            "starting with user (a system message may come first)")
    ids, labels = [tokenizer.bos_id], [IGNORE]
    scored = 0
    for i, m in enumerate(messages):
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        content = m["content"].strip()  # as the chat template's trim
        if i == 0 and system:
            content = f"{system}\n\n{content}"
        head = tokenizer.encode(f"<start_of_turn>{role}\n", add_bos=False)
        body = tokenizer.encode(content, add_bos=False) + tokenizer.encode("<end_of_turn>", add_bos=False)
        tail = tokenizer.encode("\n", add_bos=False)
        ids += head + body + tail
        if role == "model":
            if not content:
                raise DataError(f"{where}: message {i} (assistant) is empty")
            labels += [IGNORE] * len(head) + body + [IGNORE] * len(tail)
            scored += 1
        else:
            labels += [IGNORE] * (len(head) + len(body) + len(tail))
    if not scored:
        raise DataError(f"{where}: no assistant message to learn from")
    return _example(ids, labels)


def _example(ids, labels) -> Example:
    return Example(np.asarray(ids, np.int64), np.asarray(labels, np.int64))


def load_examples(path: str | Path, tokenizer, max_length: int | None = None) -> tuple[list[Example], int]:
    """Every example of a JSONL file, each cut to `max_length` tokens. Returns (examples, how many were cut).
    An example left with no target once cut is an error: it would train on nothing."""
    examples, cut = [], 0
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        ex = tokenize(row, tokenizer, where)
        if max_length is not None and len(ex.ids) > max_length:
            ex = Example(ex.ids[:max_length], ex.labels[:max_length])
            cut += 1
            if ex.targets == 0:
                raise DataError(f"{where}: nothing to learn from within --max-length {max_length} (the prompt "
                                "alone fills it)")
        examples.append(ex)
    return examples, cut


def collate(examples: list[Example], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch to its longest example: pad tokens with `pad_id`, their labels with -100 (so padding
    is never scored; it also never influences a real token, since attention is causal and pads come last).

    Shapes: B examples -> tokens (B, T), labels (B, T) int64
    """
    T = max(len(e.ids) for e in examples)
    tokens = np.full((len(examples), T), pad_id, np.int64)
    labels = np.full((len(examples), T), IGNORE, np.int64)
    for b, e in enumerate(examples):
        tokens[b, : len(e.ids)] = e.ids
        labels[b, : len(e.labels)] = e.labels
    return tokens, labels


def micro_batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)


def micro_batch(examples: list[Example], k: int, batch_size: int, seed: int) -> list[Example]:
    """The k-th micro-batch of the run (k counts across epochs): epoch e = k // per_epoch goes through the
    examples in an order shuffled by (seed, e), batch_size at a time (the last batch of an epoch may be
    smaller). It depends only on (seed, k), so a resumed run draws the same batches as an uninterrupted one
    without carrying any generator state."""
    per_epoch = micro_batches_per_epoch(len(examples), batch_size)
    epoch, j = divmod(k, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    return [examples[i] for i in order[j * batch_size: (j + 1) * batch_size]]
