"""Generation: the loop, stopping, streaming text and the chat format.

Most tests drive a scripted stand-in model whose logits we choose, so each rule is checked exactly; the
real 270M model checks that greedy generation equals argmax over full forward passes.
"""

from __future__ import annotations

import numpy as np
import pytest

from minigemma.generate import Sampling, Stats, TextStream, chat_prompt, generate, generate_ids


class CharTokenizer:
    """Token i is the character chr(ord('a') + i); 26 and 27 are <eos> and <end_of_turn>."""

    specials = {26: "<eos>", 27: "<end_of_turn>"}
    eos_id, vocab_size = 26, 28

    def is_byte(self, i):
        return False

    def decode(self, ids):
        return "".join(self.specials.get(i) or chr(ord("a") + i) for i in ids)

    def token_id(self, piece):
        return {v: k for k, v in self.specials.items()}[piece]


class ScriptedModel:
    """Logits that make `script[n]` the clear favourite at step n (token `runner_up` second)."""

    def __init__(self, script, runner_up=0, context=100):
        from minigemma.config import GemmaConfig

        self.config = GemmaConfig.from_hf_dict(dict(model_type="gemma", vocab_size=28, hidden_size=8,
                                                    intermediate_size=8, num_hidden_layers=1,
                                                    num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                                    max_position_embeddings=context, eos_token_id=26))
        self.script, self.runner_up, self.tokenizer = list(script), runner_up, CharTokenizer()
        self.calls = []

    def new_cache(self):
        class Cache:
            length = 0

        return Cache()

    def step(self, ids, cache):
        self.calls.append(list(ids))
        n = len(self.calls) - 1
        cache.length += len(ids)
        logits = np.zeros((len(ids), 28), np.float32)
        logits[-1, self.runner_up] = 1.0
        logits[-1, self.script[min(n, len(self.script) - 1)]] = 2.0
        return logits


def test_prefill_once_then_one_token_per_step():
    model = ScriptedModel([1, 2, 3, 4])
    out = list(generate_ids(model, [5, 6, 7], Sampling(max_new_tokens=4)))
    assert out == [1, 2, 3, 4]
    assert model.calls == [[5, 6, 7], [1], [2], [3]]  # no wasted step after the last token


@pytest.mark.parametrize("stop_piece", ["<eos>", "<end_of_turn>"])
def test_stops_at_eos_and_end_of_turn_unless_ignored(stop_piece):
    stop = CharTokenizer().token_id(stop_piece)
    model = ScriptedModel([1, 2, stop, 3])
    stats = Stats()
    assert "".join(generate(model, [0], Sampling(max_new_tokens=10), stats)) == "bc"
    assert stats.finish_reason == "eos" and stats.generated_tokens == 2
    text = "".join(generate(ScriptedModel([1, 2, stop, 3]), [0], Sampling(max_new_tokens=4, ignore_eos=True)))
    assert text == "bc" + stop_piece + "d"


def test_repetition_penalty_steers_away_from_seen_tokens():
    # token 1 leads (2.0) over token 0 (1.0), the rest are 0. A penalty of 3 divides seen positive logits:
    # after [1]: 1 -> 2/3 < 1, so 0 wins; after [1, 0]: 0 -> 1/3 < 2/3, so 1 wins again
    model = ScriptedModel([1] * 5, runner_up=0)
    assert list(generate_ids(model, [5], Sampling(max_new_tokens=3, repetition_penalty=3.0))) == [1, 0, 1]
    assert list(generate_ids(ScriptedModel([1] * 5), [5], Sampling(max_new_tokens=3))) == [1, 1, 1]


def test_prompt_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match="the prompt is 12 tokens; the context window is 10 tokens"):
        list(generate_ids(ScriptedModel([1], context=10), list(range(12)), Sampling()))


def test_generation_stops_at_the_context_window():
    stats = Stats()
    out = list(generate_ids(ScriptedModel([1], context=10), [0] * 7, Sampling(max_new_tokens=50), stats=stats))
    assert len(out) == 3 and stats.finish_reason == "context"  # positions 7, 8, 9 fill the window


def test_bad_sampling_values_fail_before_generation():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=2.0), dict(repetition_penalty=0.0),
                dict(max_new_tokens=-1), dict(seed=-1)):
        with pytest.raises(ValueError, match=list(bad)[0].replace("repetition_", "")):
            Sampling(**bad)


# ---- streaming text ------------------------------------------------------------------------------------


class PieceTokenizer:
    """Decodes ids to fixed pieces; one-byte pieces are byte-fallback tokens, decoded run by run as the real
    tokenizer does (valid UTF-8, or one U+FFFD per byte of an invalid run)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def is_byte(self, i):
        return len(self.pieces[i]) == 1

    def decode(self, ids):
        out, run = [], b""
        for i in list(ids) + [None]:
            if i is not None and self.is_byte(i):
                run += self.pieces[i]
                continue
            if run:
                try:
                    out.append(run.decode())
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run = b""
            if i is not None:
                out.append(self.pieces[i].decode())
        return "".join(out)


def stream(tokenizer, ids, stop=()):
    s = TextStream(tokenizer, stop)
    chunks = [s.push(i) for i in ids]
    if not s.stopped:
        chunks.append(s.flush())
    return chunks


def test_stream_never_splits_a_multibyte_character():
    emoji = "🌍".encode()  # 4 bytes, as 4 byte-fallback tokens
    tok = PieceTokenizer([b"hi ", emoji[:1], emoji[1:2], emoji[2:3], emoji[3:], b"!"])
    chunks = stream(tok, [0, 1, 2, 3, 4, 5])
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == "hi 🌍!"
    assert chunks[1:4] == ["", "", ""]  # nothing shown until the character is whole
    assert stream(tok, [0, 1, 2, 3, 4]) == ["hi ", "", "", "", "", "🌍"]  # an open run is released at the end


def test_stream_equals_decode_even_for_invalid_bytes():
    """A byte run that turns invalid is decoded as U+FFFD per byte as a whole; what was streamed agrees."""
    e_acute = "é".encode()
    tok = PieceTokenizer([b"x", e_acute[:1], e_acute[1:], b"\xe4", b"a"])
    for ids in ([0, 1, 2, 3, 4], [0, 1, 2, 4], [0, 3, 1, 2]):
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stop_string_is_cut_exactly_even_across_tokens():
    tok = PieceTokenizer([b"one ", b"tw", b"o EN", b"D three", b"E", b"Nx"])
    chunks = stream(tok, [0, 1, 2, 3, 4, 5], stop=("END",))
    assert "".join(chunks) == "one two "
    assert not any("EN" in c for c in chunks)  # the start of the stop string was held back, never shown
    # a held-back prefix that turns out not to be a stop string is shown after all
    assert "".join(stream(tok, [0, 4, 5], stop=("END",))) == "one ENx"


def test_the_earliest_of_several_stop_strings_wins():
    tok = PieceTokenizer([b"ab c", b"d"])
    for stops in (("c", "a"), ("a", "c"), ("b c", "zz")):
        cut = min(tok.decode([0, 1]).find(s) for s in stops if s in tok.decode([0, 1]))
        assert "".join(stream(tok, [0, 1], stop=stops)) == tok.decode([0, 1])[:cut]


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled():
    # the model's favourite is id 27, which a 27-piece tokenizer could not decode
    model = ScriptedModel([27] * 3, runner_up=4)
    assert list(generate_ids(model, [0], Sampling(max_new_tokens=3), vocab_size=27)) == [4, 4, 4]
    assert list(generate_ids(ScriptedModel([27] * 3), [0], Sampling(max_new_tokens=1, ignore_eos=True))) == [27]


def test_long_prompt_is_prefilled_in_chunks():
    from minigemma.generate import PREFILL_CHUNK

    model = ScriptedModel([1], context=4 * PREFILL_CHUNK)
    list(generate_ids(model, list(range(2 * PREFILL_CHUNK + 5)), Sampling(max_new_tokens=1)))
    assert [len(c) for c in model.calls] == [PREFILL_CHUNK, PREFILL_CHUNK, 5]


# ---- chat format ---------------------------------------------------------------------------------------


def test_chat_prompt_format():
    # the format of Gemma's model card and chat template (ai.google.dev/gemma/docs/core/prompt-structure)
    assert chat_prompt("  Hi there \n") == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert chat_prompt("Hi", system="Be brief.") == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert chat_prompt(turns) == ("<start_of_turn>user\nS\n\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
                                  "<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="alternate"):
        chat_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_equals_argmax_of_full_forward(real_model):
    """Temperature 0 through the KV cache equals the argmax of a fresh full forward pass at each step."""
    ids = real_model.tokenizer.encode("The three primary colors are")
    out = list(generate_ids(real_model, ids, Sampling(max_new_tokens=6, ignore_eos=True)))
    for n, token in enumerate(out):
        assert token == int(real_model.forward(ids + out[:n])[-1].argmax())


@pytest.mark.slow
def test_seed_reproduces_text_and_chat_tokens_are_single_ids(real_model):
    ids = real_model.tokenizer.encode(chat_prompt("Write a word."))
    assert ids[:2] == [real_model.config.bos_token_id, real_model.tokenizer.token_id("<start_of_turn>")]
    assert ids.count(real_model.tokenizer.token_id("<end_of_turn>")) == 1

    def sample(seed):
        s = Sampling(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=seed, ignore_eos=True)
        return list(generate_ids(real_model, ids, s))

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1  # the seed really is the source of randomness
