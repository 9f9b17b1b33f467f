"""Text generation: prefill the prompt through the KV cache, then decode one token at a time.

    prompt ids --prefill--> logits --sample--> token --decode step--> logits --sample--> token ...

`generate_ids` is the loop over token ids; `generate` wraps it with the tokenizer and streams text, never
splitting a multi-byte character and never showing a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Iterator

import numpy as np

from .errors import ContextOverflow, InvalidArgument
from .sampling import apply_repetition_penalty, sample_token


@dataclass(frozen=True)
class Sampling:
    """The usual generation controls (names and meaning as in transformers' GenerationConfig)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set with total probability >= p; 1: off
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top one's; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output; 1: off
    seed: int | None = None  # same seed, same text
    stop: tuple[str, ...] = ()  # stop strings: the text ends right before the earliest one
    ignore_eos: bool = False  # keep going past end-of-sequence / end-of-turn

    def __post_init__(self):
        """Check every value now, not at the first token: run the sampling functions once on dummy logits
        (they own the checks and raise an InvalidArgument naming the parameter)."""
        if not isinstance(self.max_new_tokens, Integral) or self.max_new_tokens < 0:
            raise InvalidArgument(f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, Integral) or self.seed < 0):
            raise InvalidArgument(f"seed must be a whole number >= 0 or None, got {self.seed!r}")
        if not isinstance(self.top_k, Integral):
            raise InvalidArgument(f"top_k must be a whole number, got {self.top_k!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not (isinstance(getattr(self, name), Real) and np.isfinite(getattr(self, name))):
                raise InvalidArgument(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidArgument(f"stop must be a tuple of strings, got {self.stop!r}")
        dummy = np.zeros(2, np.float32)
        apply_repetition_penalty(dummy, [], self.repetition_penalty)
        sample_token(dummy, np.random.default_rng(0), temperature=self.temperature)
        # greedy (temperature 0) skips the filters, so check them at temperature 1
        sample_token(dummy, np.random.default_rng(0), temperature=1.0, top_k=self.top_k, top_p=self.top_p,
                     min_p=self.min_p)


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "eos", "stop", "length" or "context"

    def as_dict(self) -> dict:
        decode_steps = max(self.generated_tokens - 1, 0)  # the first token comes from the prefill logits
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prompt_tokens / self.prefill_s, 2) if self.prefill_s else None,
            "decode_tok_s": round(decode_steps / self.decode_s, 2) if self.decode_s and decode_steps else None,
            "finish_reason": self.finish_reason,
        }


PREFILL_CHUNK = 512  # prompt tokens per prefill step: bounds the (T, S) score matrices of a long prompt


def generate_ids(model, prompt_ids, sampling: Sampling, stop_ids=(), stats: Stats | None = None,
                 vocab_size: int | None = None, cache=None) -> Iterator[int]:
    """Yield new token ids: prefill the prompt through the cache, then one decode step per token.

    `vocab_size` limits sampling to ids below it: Gemma 3 4B+ embeddings have 64 rows more than the
    tokenizer has pieces (image tokens), and an id the tokenizer can't decode must never be drawn.

    `cache`: continue a sequence the cache already holds (a chat's earlier turns); `prompt_ids` are then only
    the new tokens, and the repetition penalty sees only them and the reply. What went into the cache is
    always the first `cache.length` tokens of (earlier tokens + prompt_ids + yielded ids): a stop id is never
    fed, nor the last yielded id (its logits aren't needed), nor one the caller stopped at by not resuming.
    """
    stats = stats if stats is not None else Stats()
    try:
        prompt_ids = [int(i) for i in prompt_ids]
    except (TypeError, ValueError):
        raise InvalidArgument(f"prompt_ids must be a sequence of token ids (ints), got {prompt_ids!r:.60}") from None
    context = model.config.max_position_embeddings
    cache = model.new_cache() if cache is None else cache
    if not prompt_ids:
        raise InvalidArgument("the prompt is empty (no tokens)")
    if cache.length + len(prompt_ids) >= context:
        held = f" after the {cache.length} already in the cache" if cache.length else ""
        raise ContextOverflow(f"the prompt is {len(prompt_ids)} tokens{held}; the context window is {context} "
                              "tokens")
    stats.prompt_tokens = len(prompt_ids)
    rng = np.random.default_rng(sampling.seed)
    history = list(prompt_ids)  # what the repetition penalty looks at (prompt included, as in transformers)
    stop_ids = set() if sampling.ignore_eos else set(stop_ids)

    start = time.perf_counter()
    # Prefill in chunks: the result is the same as one big step (the cache makes continuation exact), but
    # the attention scores of a long prompt stay (H, 512, S) instead of (H, T, T).
    for i in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits = model.step(prompt_ids[i:i + PREFILL_CHUNK], cache)[-1]  # (V,) after the last prompt token
    stats.prefill_s = time.perf_counter() - start
    stats.finish_reason = "length"
    for _ in range(sampling.max_new_tokens):
        start = time.perf_counter()
        logits = apply_repetition_penalty(logits[:vocab_size], history, sampling.repetition_penalty)
        token = sample_token(logits, rng, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, min_p=sampling.min_p)
        stats.decode_s += time.perf_counter() - start  # our time only, not the caller's between yields
        if token in stop_ids:
            stats.finish_reason = "eos"
            return
        history.append(token)
        stats.generated_tokens += 1
        yield token
        if stats.generated_tokens == sampling.max_new_tokens:
            return  # no need for logits nobody will sample from
        if cache.length + 1 >= context:  # this token goes at position cache.length; no room for another
            stats.finish_reason = "context"
            return
        start = time.perf_counter()
        logits = model.step([token], cache)[-1]  # decode: one new position through the cache
        stats.decode_s += time.perf_counter() - start


def stop_token_ids(model) -> set[int]:
    """End-of-sequence ids: the config's and the tokenizer's <eos>, and <end_of_turn>, which instruction-tuned
    Gemmas emit to end their turn (gemma.cpp secondary_eos_id; HF generation_config eos [1, 106 or 107])."""
    ids = set(model.config.eos_token_id) | {model.tokenizer.eos_id}
    try:
        ids.add(model.tokenizer.token_id("<end_of_turn>"))
    except KeyError:
        pass
    return ids


class TextStream:
    """Turns generated ids into text chunks as they come, equal in the end to decoding all ids at once.

    Two things can't be shown as soon as they arrive:
      * an open run of byte-fallback tokens: an emoji is 4 byte tokens, and the tokenizer decodes a run
        of them as a whole (valid UTF-8, or one U+FFFD per byte), so a run is settled only when a
        non-byte token closes it;
      * the start of a stop string: "EN" may become "END".
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already given out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id; return the text that is now safe to show (maybe empty)."""
        self.ids.append(token)
        settled = len(self.ids)
        while settled and self.tokenizer.is_byte(self.ids[settled - 1]):
            settled -= 1  # hold back the open byte run
        text = self.tokenizer.decode(self.ids[:settled])
        cut = self._first_stop(text)
        if cut is not None:  # a complete stop string: cut right before it, and we are done
            self.stopped = True
            return self._emit(text, cut)
        end = len(text)
        for s in self.stop:  # hold back a tail that may be the start of a stop string
            k = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
            end = min(end, len(text) - k)
        return self._emit(text, end)

    def flush(self) -> str:
        """The rest, once generation has ended: open byte runs and held-back tails are final now."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = self._first_stop(text)
        self.stopped = cut is not None
        return self._emit(text, len(text) if cut is None else cut)

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in the text not yet emitted (or straddling its start)."""
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.emitted - len(s) + 1))) != -1]
        return min(hits, default=None)

    def _emit(self, text: str, end: int) -> str:
        chunk = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk


def generate(model, prompt_ids, sampling: Sampling = Sampling(), stats: Stats | None = None) -> Iterator[str]:
    """Generate text from prompt token ids, yielding chunks of text as they are settled."""
    stream = TextStream(model.tokenizer, sampling.stop)
    for token in generate_ids(model, prompt_ids, sampling, stop_token_ids(model), stats,
                              vocab_size=model.tokenizer.vocab_size):
        chunk = stream.push(token)
        if chunk:
            yield chunk
        if stream.stopped:
            break
    rest = stream.flush()  # "" if a stop string already ended the text
    if stream.stopped and stats is not None:
        stats.finish_reason = "stop"
    if rest:
        yield rest


def chat_prompt(messages: list[dict] | str, system: str | None = None) -> str:
    """Gemma's chat format, ending with the opening of the model's turn.

        <start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n

    Roles are only `user` and `model` (`assistant` is accepted as `model`), strictly alternating from a user
    turn; a system message is folded into the first user turn, as Gemma 3's official template does (Gemma
    has no system role: google/gemma-2-27b-it discussion #9). Content is stripped, as the template's `trim`.
    BOS is not in the text: the tokenizer adds it.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = messages[0]["content"].strip() + "\n\n"
        messages = messages[1:]
    parts = []
    for i, m in enumerate(messages):
        role = {"assistant": "model"}.get(m["role"], m["role"])
        if role != ("user" if i % 2 == 0 else "model"):
            raise InvalidArgument(f"message {i} has role {m['role']!r}: roles must alternate user/model, "
                             "starting with user (a system message may come first)")
        content = (prefix if i == 0 else "") + m["content"].strip()
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    return "".join(parts) + "<start_of_turn>model\n"
