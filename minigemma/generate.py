"""Text generation: prefill the prompt through the KV cache, then decode one token at a time.

    prompt ids --prefill--> logits --sample--> token --decode step--> logits --sample--> token ...

`generate_ids` is the loop over token ids; `generate` wraps it with the tokenizer and streams text, never
splitting a multi-byte character and never showing a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

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
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one
    ignore_eos: bool = False  # keep going past end-of-sequence / end-of-turn

    def __post_init__(self):
        """Check every value now, not at the first token: run the sampling functions once on dummy logits
        (they own the checks and raise a ValueError naming the parameter)."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
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
    extra: dict = field(default_factory=dict)

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
            **self.extra,
        }


def generate_ids(model, prompt_ids, sampling: Sampling, stop_ids=(), stats: Stats | None = None) -> Iterator[int]:
    """Yield new token ids: one prefill over the prompt, then one decode step per token."""
    stats = stats if stats is not None else Stats()
    prompt_ids = [int(i) for i in prompt_ids]
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt is empty (no tokens)")
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the context window is {context} tokens")
    stats.prompt_tokens = len(prompt_ids)
    rng = np.random.default_rng(sampling.seed)
    history = list(prompt_ids)  # what the repetition penalty looks at (prompt included, as in transformers)
    stop_ids = set() if sampling.ignore_eos else set(stop_ids)

    cache = model.new_cache()
    start = time.perf_counter()
    logits = model.step(prompt_ids, cache)[-1]  # prefill: (V,) logits after the last prompt token
    stats.prefill_s = time.perf_counter() - start
    stats.finish_reason = "length"
    for _ in range(sampling.max_new_tokens):
        start = time.perf_counter()
        logits = apply_repetition_penalty(logits, history, sampling.repetition_penalty)
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
    """End-of-sequence ids: the config's eos, and <end_of_turn>, which instruction-tuned Gemmas emit to end
    their turn (gemma.cpp secondary_eos_id, HF generation_config eos_token_id [1, 106 or 107])."""
    ids = set(model.config.eos_token_id)
    try:
        ids.add(model.tokenizer.token_id("<end_of_turn>"))
    except KeyError:
        pass
    return ids


class TextStream:
    """Turns generated ids into text chunks as they come.

    Decoding one token at a time can split a multi-byte character over two byte-fallback tokens (an emoji is
    4 byte tokens), so we decode everything generated so far and emit only the settled new part: nothing
    while the text ends in U+FFFD (an incomplete UTF-8 sequence), and nothing that could still turn out to be
    the start of a stop string.
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
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:  # a complete stop string: cut right before it, and we are done
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return self._emit(text, end)

    def flush(self) -> str:
        """The rest, once generation has ended (a held-back partial stop string is real text after all)."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        chunk = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk


def generate(model, prompt_ids, sampling: Sampling = Sampling(), stats: Stats | None = None) -> Iterator[str]:
    """Generate text from prompt token ids, yielding chunks of text as they are settled."""
    stream = TextStream(model.tokenizer, sampling.stop)
    for token in generate_ids(model, prompt_ids, sampling, stop_token_ids(model), stats):
        chunk = stream.push(token)
        if chunk:
            yield chunk
        if stream.stopped:
            if stats is not None:
                stats.finish_reason = "stop"
            return
    rest = stream.flush()
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
            raise ValueError(f"message {i} has role {m['role']!r}: roles must alternate user/model, "
                             "starting with user (a system message may come first)")
        content = (prefix if i == 0 else "") + m["content"].strip()
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    return "".join(parts) + "<start_of_turn>model\n"
