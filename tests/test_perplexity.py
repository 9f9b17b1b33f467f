"""Perplexity with sliding windows (minigemma/perplexity.py) and the `perplexity` command.

The oracle is the definition, computed here the slow way: one full forward pass per window, a log-softmax,
and the log-probability of each token at the position that predicts it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minigemma
from conftest import make_hf_model, save
from minigemma.perplexity import log_softmax, perplexity, windows


@pytest.mark.parametrize("shape", [(300,), (7, 300), (2, 5, 300), (0, 300), "transposed"])
def test_log_softmax_is_torchs(shape):
    """log_softmax (the oracle's too, below) against torch's in float64, on every row, and bit for bit the
    whole-array formula: it works in place a few rows at a time (LOG_SOFTMAX_ROWS), 7 or 10 rows end in a
    partial block, and a non-contiguous input (a transposed (5, 2, 300) view) must not be left unnormalised."""
    torch = pytest.importorskip("torch")
    if shape == "transposed":
        logits = (np.random.default_rng(0).standard_normal((300, 2, 5)) * 8).astype(np.float32).T
    else:
        logits = (np.random.default_rng(0).standard_normal(shape) * 8).astype(np.float32)
    given = logits.copy()
    ours = log_softmax(logits)
    theirs = torch.log_softmax(torch.from_numpy(logits.copy()).double(), dim=-1).numpy()
    assert ours.shape == logits.shape and ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    x = np.ascontiguousarray(logits, dtype=np.float64)  # C order: each row's sums in the same order as ours
    x -= x.max(axis=-1, keepdims=True)
    assert np.array_equal(ours, x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))  # the same operations
    assert np.array_equal(logits, given)  # the input is left as it was


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), context=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once_with_enough_history(n, context, data):
    stride = data.draw(st.integers(1, context - 1))
    ws = windows(n, context, stride)
    scored = [i for w in ws for i in range(w.scored_from, w.stop)]
    assert scored == list(range(n))  # each token once, in order
    for w in ws:
        assert 0 <= w.start <= w.scored_from < w.stop <= n
        assert w.stop - w.start <= context - 1  # <bos> + the window fits the context
        # history before the first scored token: all there is, or at least context - 1 - stride tokens
        assert w.scored_from - w.start >= min(w.scored_from, context - 1 - stride)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return minigemma.load(save(make_hf_model("gemma2", seed=3, sliding_window=6), tmp_path_factory.mktemp("ppl")))


def by_definition(model, ids, context, stride):
    """Each window's full logits, and -log p(token) where each token is scored."""
    bos = model.config.bos_token_id
    nll = []
    for w in windows(len(ids), context, stride):
        logp = log_softmax(model.forward([bos] + ids[w.start:w.stop]))  # row k predicts ids[w.start + k]
        nll += [-logp[i - w.start, ids[i]] for i in range(w.scored_from, w.stop)]
    return np.array(nll)


@pytest.mark.parametrize("context, stride", [(200, 100), (16, 5), (9, 8), (3, 1)])
def test_perplexity_is_its_definition(tiny, monkeypatch, context, stride):
    """Whatever the windows and however the scored positions are cut into chunks (SCORE_CHUNK of 4 here)."""
    import minigemma.perplexity as ppl

    monkeypatch.setattr(ppl, "SCORE_CHUNK", 4)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 160, size=41)]
    result = perplexity(tiny, ids, context=context, stride=stride)
    expected = by_definition(tiny, ids, context, stride)
    assert result.tokens == len(ids)
    np.testing.assert_allclose(result.per_token_nll, expected, rtol=1e-5, atol=1e-6)
    assert result.perplexity == pytest.approx(np.exp(expected.mean()), rel=1e-5)


def test_against_itself_kl_is_zero_and_top1_agrees(tiny):
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 160, size=30)]
    r = perplexity(tiny, ids, context=12, stride=4, reference=tiny).as_dict()
    assert abs(r["mean_kl"]) < 1e-9 and r["top1_agreement"] == 1.0


def test_against_other_weights_kl_is_positive(tiny):
    """Against a model whose weights differ (its own int8 version), KL is > 0 and agrees with a direct
    computation on full forward passes."""
    int8 = minigemma.load(tiny.source, quantize="int8")
    ids = [int(i) for i in np.random.default_rng(2).integers(3, 160, size=20)]
    r = perplexity(int8, ids, context=32, stride=16, reference=tiny)
    bos = tiny.config.bos_token_id
    p_ref, p = log_softmax(tiny.forward([bos] + ids)), log_softmax(int8.forward([bos] + ids))
    kl = (np.exp(p_ref) * (p_ref - p)).sum(-1)[:len(ids)]  # rows 0..n-1 predict ids[0..n-1]
    assert r.kl_sum / r.tokens == pytest.approx(kl.mean(), rel=1e-4)
    assert r.kl_sum > 0


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match="stride must be between 1 and context - 1 = 7, got 8"):
        windows(10, 8, 8)
    with pytest.raises(ValueError, match="context must be >= 2"):
        windows(10, 1, 1)


@pytest.mark.slow
def test_perplexity_command(real_model):
    """The command on the built-in model, from standard input, against its own float32 weights: the numbers
    of the library's function, KL 0 and full agreement."""
    text = "The quick brown fox jumps over the lazy dog. " * 4
    cmd = [sys.executable, "-m", "minigemma", "perplexity", "-", "--quantize", "none", "--context", "16",
           "--stride", "6", "--compare-to", "none", "--stats"]
    out = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    ids = real_model.tokenizer.encode(text, add_bos=False)
    expected = perplexity(real_model, ids, context=16, stride=6)
    assert stats["tokens"] == len(ids)
    assert stats["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)
    assert stats["mean_kl"] == 0 and stats["top1_agreement"] == 1.0
    assert stats["weight_bytes"] == real_model.nbytes
    assert f"perplexity {expected.perplexity:.4f}" in out.stdout
