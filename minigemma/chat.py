"""A multi-turn conversation that keeps its KV cache: each turn prefills only its new tokens.

The conversation *is* a list of token ids, `tokens`, and the cache always holds a prefix of it:

    tokens:  <bos><start_of_turn>user\\n Hi<end_of_turn>\\n<start_of_turn>model\\n Hello!<end_of_turn>\\n
    cache:   |<------------------------- cache.length ------------------------->|   (the rest is pending)

Why tokens and not text: the cache can't forget (a sliding-window layer has already dropped what fell out of
its window, so there is no rolling back), so what the model has seen is the record. Re-encoding the text of
the conversation could give other ids than the ones the model generated (a stop string cut mid-token, a
non-canonical split), and the cache would silently disagree with the transcript. So after a reply, the
conversation appends exactly the ids the model produced, then `<end_of_turn>\\n`; whatever of that the cache
has not seen yet (the last sampled id, which was never fed back; the end of turn, which the model emitted
as a stop id or which we add when the reply was cut) is fed at the start of the next turn, together with
the user's new turn, in one prefill.

The format is Gemma's (`generate.chat_prompt`): the system message, if any, folded into the first user turn.
"""

from __future__ import annotations

from typing import Iterator

from .errors import ContextOverflow
from .generate import Sampling, Stats, TextStream, chat_prompt, generate_ids, stop_token_ids


class Conversation:
    """Turns of a chat with one model, and the cache that holds them."""

    def __init__(self, model, system: str | None = None):
        self.model = model
        self.system = system
        self.end_of_turn = model.tokenizer.encode("<end_of_turn>\n", add_bos=False)  # [106, 107] in Gemma's vocab
        self.reset()

    def reset(self):
        """Forget everything (the system message stays)."""
        self.cache = self.model.new_cache()
        self.tokens: list[int] = []  # the whole conversation; the cache holds tokens[:cache.length]

    @property
    def pending(self) -> list[int]:
        """Tokens of the conversation that the cache has not seen yet."""
        return self.tokens[self.cache.length:]

    def turn_ids(self, text: str) -> list[int]:
        """The ids of a new user turn and the opening of the model's reply (with <bos> and the system message
        on the first turn)."""
        first = not self.tokens
        return self.model.tokenizer.encode(chat_prompt(text, system=self.system if first else None), add_bos=first)

    def reply(self, text: str, sampling: Sampling = Sampling(), stats: Stats | None = None) -> Iterator[str]:
        """Add the user's message and stream the model's reply as text, one chunk per token (maybe "").

        The caller may stop iterating at any time (Ctrl-C): the reply is then cut there and the conversation
        stays consistent. Raises ContextOverflow, with nothing changed, if the turn doesn't fit.
        """
        stats = stats if stats is not None else Stats()
        turn = self.turn_ids(text)
        total = len(self.tokens) + len(turn)
        context = self.model.config.max_position_embeddings
        if total + len(self.end_of_turn) >= context:  # no room for a reply and its end of turn
            raise ContextOverflow(f"this turn would bring the conversation to {total} tokens; the context "
                                  f"window is {context} tokens")
        new = self.pending + turn
        generated: list[int] = []
        stream = TextStream(self.model.tokenizer, sampling.stop)
        failed = False
        try:
            for token in generate_ids(self.model, new, sampling, stop_token_ids(self.model), stats,
                                      vocab_size=self.model.tokenizer.vocab_size, cache=self.cache):
                generated.append(token)
                yield stream.push(token)  # maybe "" (text held back), so a caller can stop after any token
                if stream.stopped:
                    stats.finish_reason = "stop"
                    break
            rest = stream.flush()
            if rest:
                yield rest
        except Exception:  # an error inside a model step may leave the cache half-updated: start over
            failed = True
            self.reset()
            raise
        finally:  # also when the caller stops early (GeneratorExit is not an Exception)
            if not failed:
                # the model's turn is the ids it produced, then the end of turn; the cache holds the first
                # of them already, the rest (at least the end of turn) is pending for the next turn
                self.tokens = self.tokens + turn + generated + self.end_of_turn

    def room(self) -> int:
        """How many more tokens fit in the context window."""
        return self.model.config.max_position_embeddings - len(self.tokens)
