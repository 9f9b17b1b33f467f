"""Training data (data.py): TRL's tokenization rule, Gemma's chat template with assistant-only loss, truncation,
batching, and errors that name the file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune_helpers import tiny_tokenizer_proto
from minigemma.data import (IGNORE, DataError, Example, collate, load_examples, micro_batch, read_jsonl,
                            tokenize)
from minigemma.generate import chat_prompt
from minigemma.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tiny_tokenizer_proto())


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_is_scored_everywhere_with_eos(tok):
    ex = tokenize({"text": "the cat sat"}, tok)
    assert ex.ids.tolist() == tok.encode("the cat sat", add_bos=True) + [tok.eos_id]
    assert ex.labels.tolist() == ex.ids.tolist()


def test_prompt_completion_follows_trl(tok):
    """TRL's SFTTrainer: tokenize the prompt, and prompt + completion, append <eos>; the loss starts after
    the prompt's tokens. Including where the two tokenizations part at the boundary ("th" + "e" -> "the")."""
    prompt, completion = "say th", "e answer"
    ex = tokenize({"prompt": prompt, "completion": completion}, tok)
    prompt_ids = tok.encode(prompt, add_bos=True)
    full = tok.encode(prompt + completion, add_bos=True) + [tok.eos_id]
    assert ex.ids.tolist() == full
    assert ex.labels.tolist() == [IGNORE] * len(prompt_ids) + full[len(prompt_ids):]
    assert prompt_ids != full[:len(prompt_ids)]  # this pair does merge across the boundary
    assert ex.targets == len(full) - len(prompt_ids)


def test_messages_use_gemma_template_and_score_assistant_turns(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": " hello "}, {"role": "user", "content": "and"},
                {"role": "assistant", "content": "bye"}]
    ex = tokenize({"messages": messages}, tok)
    # the ids are the tokenization of the template's text (chat_prompt = the format generate uses)
    text = chat_prompt(messages[:3] + [messages[3]])[: -len("<start_of_turn>model\n")]
    text += "<start_of_turn>model\nbye<end_of_turn>\n"
    assert ex.ids.tolist() == tok.encode(text, add_bos=True)
    # scored: each reply and its <end_of_turn>, nothing else
    scored = [int(i) for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    expected = (tok.encode("hello", add_bos=False) + [tok.token_id("<end_of_turn>")]
                + tok.encode("bye", add_bos=False) + [tok.token_id("<end_of_turn>")])
    assert scored == expected
    assert np.all(ex.labels[ex.labels != IGNORE] == ex.ids[ex.labels != IGNORE])


def test_truncation_counts_cut_examples(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "a b c d e f g h"}, {"text": "ab"}, "",
                                         {"prompt": "x", "completion": "yz yz yz yz"}])
    full, cut = load_examples(path, tok)
    assert cut == 0 and len(full) == 3
    short, cut = load_examples(path, tok, max_length=6)
    assert cut == 2 and [len(e.ids) for e in short] == [6, len(full[1].ids), 6]
    assert short[0].ids.tolist() == full[0].ids[:6].tolist()
    with pytest.raises(DataError, match=r"d.jsonl:4: nothing to learn from within --max-length 2"):
        load_examples(path, tok, max_length=2)


@pytest.mark.parametrize("line, message", [
    ('{"text": "a"', r"bad.jsonl:2: not JSON"),
    ('["text"]', r"bad.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "a"}', r"bad.jsonl:2: has prompt but no 'completion'"),
    ('{"prompt": "a", "completion": "  "}', r"bad.jsonl:2: the completion is empty"),
    ('{"input": "a"}', r"bad.jsonl:2: expected a \"text\", \"prompt\" and \"completion\", or \"messages\" "
                       r"field, got 'input'"),
    ('{"text": 3}', r"bad.jsonl:2: 'text' must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"bad.jsonl:2: no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', r"bad.jsonl:2: message 0 has role 'assistant'"),
    ('{"messages": "hi"}', r"bad.jsonl:2: \"messages\" must be a non-empty list"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError, match=message):
        load_examples(path, tok)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_collate_pads_right_with_ignored_labels():
    a = Example(np.array([2, 5, 6, 1]), np.array([IGNORE, IGNORE, 6, 1]))
    b = Example(np.array([2, 7]), np.array([2, 7]))
    tokens, labels = collate([a, b], pad_id=0)
    assert tokens.tolist() == [[2, 5, 6, 1], [2, 7, 0, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 6, 1], [2, 7, IGNORE, IGNORE]]


def test_micro_batches_shuffle_per_epoch_deterministically():
    examples = [Example(np.array([i]), np.array([i])) for i in range(10)]
    def ids(k, seed=0):
        return [int(e.ids[0]) for e in micro_batch(examples, k, 4, seed)]
    epoch0 = ids(0) + ids(1) + ids(2)
    epoch1 = ids(3) + ids(4) + ids(5)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # each epoch sees every example once
    assert len(ids(2)) == 2  # the last batch of an epoch is what is left
    assert epoch0 != epoch1 and epoch0 != list(range(10))  # reshuffled each epoch
    assert ids(4) == ids(4) and ids(4, seed=1) != ids(4)  # a function of (seed, k) only
