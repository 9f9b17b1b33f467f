"""Perplexity over a text of any length, and how far a quantized model's predictions are from the reference.

Perplexity is exp(mean negative log-likelihood) of each token given the ones before it. A text longer than
the context is scored with a sliding window (as in transformers' perplexity guide and llama.cpp's
`perplexity`): each window holds at most `context` tokens, starts with <bos> (Gemma expects it), and moves on
by `stride` tokens; only the tokens no earlier window has scored are scored, each with at least
`context - stride` tokens of history once the first window is full.

With a reference model (the float32 weights, say) the same windows also give, at each scored position, the
KL divergence KL(P_ref || P) of the two next-token distributions and whether their top-1 tokens agree.

Logits are computed only where they are scored, in chunks, through the KV cache: a window's unscored prefix is
a prefill that keeps the last position only; a (512, 262144) float32 logits block would be 537 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

SCORE_CHUNK = 64  # positions whose logits are computed at once: (64, V) float32 is 67 MB for V = 262144


@dataclass
class Window:
    start: int  # first text token in the window (the window is <bos> + ids[start:stop])
    stop: int
    scored_from: int  # the window scores ids[scored_from:stop]


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows over a text of n_tokens (without <bos>), each <bos> + at most context - 1 tokens.

    >>> [(w.start, w.stop, w.scored_from) for w in windows(10, 5, 2)]
    [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens (<bos> and one to score), got {context}")
    if not 1 <= stride <= context - 1:
        raise ValueError(f"stride must be between 1 and context - 1 = {context - 1}, got {stride}")
    span = context - 1  # text tokens per window, after <bos>
    out = [Window(0, min(span, n_tokens), 0)]
    while out[-1].stop < n_tokens:
        stop = min(out[-1].stop + stride, n_tokens)
        out.append(Window(max(0, stop - span), stop, out[-1].stop))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Shapes: (..., V) -> (..., V) float64 (the sums over 262144 entries stay exact enough)

    In place, LOG_SOFTMAX_ROWS rows at a time: exp's temporary is then a few MB that malloc reuses, where one
    for all rows at once (134 MB for a (64, 262144) chunk) is fresh memory each time, faulted in page by page:
    3x slower for the same numbers."""
    out = logits.astype(np.float64, order="C")  # a copy, C-ordered whatever the input's order,
    rows = out.reshape(-1, out.shape[-1])  # so that this is a view: the loop writes into out
    for start in range(0, len(rows), LOG_SOFTMAX_ROWS):
        x = rows[start:start + LOG_SOFTMAX_ROWS]
        x -= x.max(axis=-1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


LOG_SOFTMAX_ROWS = 4  # 8 MB of float64 for V = 262144


def scored_logits(model, bos: int, ids: list[int], w: Window) -> Iterator[tuple[int, np.ndarray]]:
    """Logits predicting ids[i] for i in w.scored_from..w.stop-1, in chunks: yields (i, (n, V) logits).

    The window's tokens go through a KV cache: first <bos> + the unscored prefix (only its last logits are
    kept, they predict the first scored token), then the scored tokens a chunk at a time."""
    cache = model.new_cache()
    prefix = [bos] + ids[w.start:w.scored_from]
    pending = model.step(prefix, cache, last_only=True)  # (1, V): predicts ids[scored_from]
    i = w.scored_from
    while i < w.stop:
        n = min(SCORE_CHUNK, w.stop - i)
        # feeding ids[i:i+n-1] gives the logits for ids[i+1:i+n]; with the pending row, n predictions
        more = model.step(ids[i:i + n - 1], cache, last_only=False) if n > 1 else pending[:0]
        logits = np.concatenate([pending, more])  # (n, V)
        yield i, logits
        if i + n < w.stop:
            pending = model.step([ids[i + n - 1]], cache, last_only=True)
        i += n


@dataclass
class Result:
    tokens: int = 0  # positions scored
    nll: float = 0.0  # summed negative log-likelihood (nats)
    kl_sum: float = 0.0  # summed KL(P_ref || P), with a reference
    top1_agree: int = 0  # positions where both models' argmax agree, with a reference
    compared: bool = False
    per_token_nll: list[float] = field(default_factory=list, repr=False)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.tokens))

    def as_dict(self) -> dict:
        d = {"tokens": self.tokens, "nll_per_token": round(self.nll / self.tokens, 6),
             "perplexity": round(self.perplexity, 4)}
        if self.compared:
            d.update(mean_kl=round(self.kl_sum / self.tokens, 6), top1_agreement=round(self.top1_agree / self.tokens, 6))
        return d


def perplexity(model, ids: list[int], context: int = 512, stride: int | None = None, reference=None,
               progress: Callable[[int], None] = lambda n: None) -> Result:
    """Score every token of `ids` (a text's ids without <bos>), optionally against a reference model.

    `progress(n)` is called with the number of positions just scored (for a progress bar)."""
    ids = [int(i) for i in ids]
    if len(ids) < 1:
        raise ValueError("the text has no tokens to score")
    context = min(context, model.config.max_position_embeddings)
    stride = stride or context // 2
    bos = model.config.bos_token_id
    result = Result(compared=reference is not None)
    for w in windows(len(ids), context, stride):
        ref_chunks = scored_logits(reference, bos, ids, w) if reference is not None else None
        for i, logits in scored_logits(model, bos, ids, w):
            logp = log_softmax(logits)  # (n, V)
            targets = np.array(ids[i:i + len(logits)])
            nll = -logp[np.arange(len(targets)), targets]
            result.nll += float(nll.sum())
            result.per_token_nll.extend(nll.tolist())
            result.tokens += len(targets)
            if ref_chunks is not None:
                _, ref_logits = next(ref_chunks)
                ref_logp = log_softmax(ref_logits)
                result.kl_sum += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
                result.top1_agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
            progress(len(targets))
    return result


def reference_text() -> str:
    """The text minigemma measures perplexity on when given none: the Python Language Reference topics that
    ship with CPython itself (`pydoc_data.topics`, what `help("if")` prints), about 460,000 characters of
    technical English with code. Every Python install has it, nothing is downloaded, and it is not a
    benchmark set a model may have been tuned on. (It changes a little between Python versions: say which
    when you quote a number.)

    Its prose is hard-wrapped at 72 columns for a terminal; where a line breaks is typesetting that no model
    can predict, so each prose paragraph is re-flowed into one line. Indented blocks (code, grammar rules,
    tables) and headings keep their lines."""
    from pydoc_data.topics import topics

    def reflow(paragraph: str) -> str:
        lines = paragraph.split("\n")
        is_prose = len(lines) > 1 and not any(line.startswith(" ") or set(line) <= set("*=-") for line in lines)
        return " ".join(line.strip() for line in lines) if is_prose else paragraph

    return "\n\n".join("\n\n".join(reflow(p) for p in topics[k].strip().split("\n\n")) for k in sorted(topics))
