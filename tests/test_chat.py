"""Chat: the conversation keeps its cache across turns, and the cache always holds a prefix of the transcript.

API tests check the cache against a fresh run over the whole transcript; the command is tested end to end
in a pseudo-terminal (pexpect), as a user would type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

import numpy as np
import pytest

from conftest import default_sigint
from minigemma.chat import Conversation
from minigemma.errors import ContextOverflow
from minigemma.generate import Sampling, Stats, chat_prompt
from minigemma.model import Gemma

pytestmark = pytest.mark.slow


def check_cache_holds_transcript(conversation):
    """Feed what is pending (as the next turn would) and compare the cached logits with a fresh forward pass
    over the whole transcript. Returns the relative difference."""
    model = conversation.model
    cached = model.step(conversation.pending, conversation.cache, last_only=True)[0]  # (V,)
    assert conversation.cache.length == len(conversation.tokens)
    fresh = model.forward(conversation.tokens)[-1]  # (V,)
    return float(np.max(np.abs(cached - fresh)) / np.max(np.abs(fresh)))


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_run(real_model):
    tok = real_model.tokenizer
    conversation = Conversation(real_model, system="Be brief.")
    first = Stats()
    reply1 = "".join(conversation.reply("The capital of France is", Sampling(max_new_tokens=6), first))
    assert first.finish_reason == "length" and first.generated_tokens == 6
    # the model's turn: exactly the ids it produced, then <end_of_turn>\n; the last id and the end of turn
    # were never fed (nothing needed their logits), so they are pending
    assert conversation.tokens[-2:] == [tok.token_id("<end_of_turn>"), tok.encode("\n", add_bos=False)[0]]
    assert len(conversation.pending) == 3
    assert tok.decode(conversation.tokens) == chat_prompt([
        {"role": "user", "content": "The capital of France is"}, {"role": "model", "content": reply1}],
        system="Be brief.")[:-len("<start_of_turn>model\n")]

    history = len(conversation.tokens)
    second = Stats()
    reply2 = "".join(conversation.reply("And of Germany?", Sampling(max_new_tokens=5), second))
    turn = tok.encode(chat_prompt("And of Germany?"), add_bos=False)
    assert second.prompt_tokens == 3 + len(turn) < history + len(turn)  # only the new tokens were prefilled
    # the cache and the transcript are the same tokens: re-tokenizing the transcript's text gives them back
    assert tok.encode(tok.decode(conversation.tokens)) == conversation.tokens
    assert reply2 == tok.decode(conversation.tokens[history + len(turn):-2])
    assert check_cache_holds_transcript(conversation) < 1e-4  # measured 1.2e-6: float32 rounding


def test_a_stop_string_or_an_early_stop_leaves_cache_and_transcript_consistent(real_model):
    conversation = Conversation(real_model)
    stats = Stats()
    text = "".join(conversation.reply("Monday, Tuesday,", Sampling(max_new_tokens=20, stop=("Tuesday",)), stats))
    assert stats.finish_reason == "stop" and text == "Monday, "  # the model repeats the prompt, cut at the stop
    assert check_cache_holds_transcript(conversation) < 1e-4  # measured 2.2e-6

    # the caller stops iterating after three tokens, as the CLI does on Ctrl-C
    reply = conversation.reply("Go on", Sampling(max_new_tokens=50))
    for _ in range(3):
        next(reply)
    reply.close()
    assert len(conversation.tokens) - conversation.cache.length == 3  # last id + end of turn pending
    assert check_cache_holds_transcript(conversation) < 1e-4  # measured 2.6e-6

    conversation.reset()
    assert conversation.tokens == [] and conversation.cache.length == 0


def test_a_conversation_that_outgrows_the_context_says_so(real_model):
    small = Gemma(dataclasses.replace(real_model.config, max_position_embeddings=48), real_model.params,
                  real_model.tokenizer, source="small")
    conversation = Conversation(small)
    "".join(conversation.reply("Hello there", Sampling(max_new_tokens=8)))
    before = list(conversation.tokens)
    with pytest.raises(ContextOverflow, match="the context window is 48 tokens"):
        "".join(conversation.reply("Tell me a long story about " + "many " * 30, Sampling(max_new_tokens=8)))
    assert conversation.tokens == before  # nothing was fed


# ---------------------------------------------------------------------------------------------- the terminal

pexpect = pytest.importorskip("pexpect")


def spawn(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "minigemma", "chat", *args], env=env, encoding="utf-8",
                          preexec_fn=default_sigint,
                          timeout=300, dimensions=(24, 200))
    child.expect_exact("> ")  # loaded, waiting for the first line
    return child


def turn_stats(child) -> dict:
    child.expect(r'\{"prompt_tokens[^\r\n]*\}')
    stats = json.loads(child.after)
    child.expect_exact("> ")
    return stats


def test_chat_in_a_terminal_keeps_its_cache_resets_and_quits():
    child = spawn("--max-new-tokens", "5", "--stats", "--system", "Be brief.")
    child.sendline("The capital of France is")
    first = turn_stats(child)
    assert first["cached_tokens"] == 0 and first["generated_tokens"] == 5
    child.sendline("And of Germany?")
    second = turn_stats(child)
    # the second turn prefilled only its own tokens (plus the 3 pending from the first reply)
    assert second["cached_tokens"] == first["conversation_tokens"] - 3
    history = second["conversation_tokens"] - second["generated_tokens"] - 2  # all but the reply and its end
    assert second["prompt_tokens"] == history - second["cached_tokens"] < history

    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.sendline("Hello")
    assert turn_stats(child)["cached_tokens"] == 0  # a fresh conversation
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_interrupts_a_reply_then_exits_130_at_the_prompt():
    child = spawn("--max-new-tokens", "400", "--stats")
    child.sendline("Once upon a time")
    child.expect(r"Once upon a time\r\n\S")  # the echo, then the reply has started
    child.kill(signal.SIGINT)  # what the terminal sends for Ctrl-C
    child.expect_exact("(interrupted)")
    stats = turn_stats(child)
    assert stats["finish_reason"] == "interrupted" and stats["generated_tokens"] < 400

    child.sendline("/system Answer in French.")  # the conversation goes on after an interruption
    child.expect_exact("(system message set; conversation reset)")
    child.expect_exact("> ")
    child.kill(signal.SIGINT)  # at the prompt: leave
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_chat_ctrl_d_leaves():
    child = spawn("--max-new-tokens", "2")
    child.sendline("Hi")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
