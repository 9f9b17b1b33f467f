"""Cached decoding equals the full forward pass, at every step, well past the sliding window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_params, rel_err
from minigemma.config import GemmaConfig
from minigemma import model as model_module
from minigemma import kernels, layers
from minigemma.layers import mlp
from minigemma.model import Gemma
from minigemma.recording import record_forward


@st.composite
def configs(draw):
    model_type = draw(st.sampled_from(["gemma", "gemma2", "gemma3_text"]))
    K = draw(st.sampled_from([1, 2, 4]))
    H = K * draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(1, 4))
    d = dict(model_type=model_type, vocab_size=50, hidden_size=16, intermediate_size=24,
             num_hidden_layers=n_layers, num_attention_heads=H, num_key_value_heads=K,
             head_dim=draw(st.sampled_from([4, 8])), sliding_window=draw(st.integers(1, 6)),
             sliding_window_pattern=draw(st.integers(1, 3)))
    if model_type == "gemma2":
        d.update(attn_logit_softcapping=draw(st.sampled_from([None, 2.0])), final_logit_softcapping=5.0)
    return GemmaConfig.from_hf_dict(d)


@settings(max_examples=60, deadline=None)
@given(config=configs(), length=st.integers(2, 30), prefill=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_cached_decode_equals_full_forward(config, length, prefill, seed):
    rng = np.random.default_rng(seed)
    model = Gemma(config, random_params(config, rng))
    ids = rng.integers(0, config.vocab_size, length)
    full = model.forward(ids)  # (T, V), a fresh cache

    prefill = min(prefill, length)
    cache = model.new_cache()
    steps = [model.step(ids[:prefill], cache, last_only=False)]  # prefill: logits of every prompt position
    for t in range(prefill, length):
        steps.append(model.step(ids[t:t + 1], cache))  # decode: one token at a time
        # a sliding layer never holds more than the W - 1 positions the next query can see
        for i, layer in enumerate(cache.layers):
            window = config.layer_window(i)
            assert layer.k.shape[1] == (t + 1 if window is None else min(t + 1, window - 1))
    cached = np.concatenate(steps)

    assert cache.length == length
    assert cached.shape == full.shape
    assert rel_err(cached, full) < 1e-5


@settings(max_examples=40, deadline=None)
@given(config=configs(), length=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_last_only_prefill_is_the_last_row_and_caches_every_position(config, length, seed):
    """With last_only, the last layer carries only the last position past its keys and values (model.forward),
    unless a recording is on: the logits are the full pass's last row, the cache holds the same keys and values
    as after a full prefill, and the next decode step is the full pass's too."""
    rng = np.random.default_rng(seed)
    model = Gemma(config, random_params(config, rng))
    ids = rng.integers(0, config.vocab_size, length + 1)
    full = model.forward(ids)  # (T + 1, V)
    rows = []  # the rows each layer's MLP activation sees
    model.backend = dataclasses.replace(kernels.NUMPY, geglu=lambda g, u: (rows.append(len(g)), layers.geglu(g, u))[1])
    cache, everything = model.new_cache(), model.new_cache()
    last = model.step(ids[:length], cache, last_only=True)
    assert rows == [length] * (config.num_hidden_layers - 1) + [1]  # the last layer's MLP saw one row
    with record_forward() as rec:  # a recording sees every row of every layer, last_only or not
        assert rel_err(model.step(ids[:length], model.new_cache(), last_only=True), last) < 1e-6
    assert rec[config.num_hidden_layers - 1, "mlp_out"].shape[0] == length
    model.step(ids[:length], everything, last_only=False)
    assert last.shape == (1, config.vocab_size)
    assert rel_err(last, full[length - 1:length]) < 1e-5
    for ours, theirs in zip(cache.layers, everything.layers):
        assert np.array_equal(ours.k, theirs.k) and np.array_equal(ours.v, theirs.v)
    assert rel_err(model.step(ids[length:], cache), full[length:]) < 1e-5


def tiny_model(seed: int = 0) -> Gemma:
    config = GemmaConfig.from_hf_dict(dict(model_type="gemma3_text", vocab_size=50, hidden_size=16,
                                           intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8, sliding_window=3,
                                           sliding_window_pattern=2))
    return Gemma(config, random_params(config, np.random.default_rng(seed)))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("new_tokens", [1, 70])  # 70: past the first buffer (64 slots), so buffers are replaced
def test_interrupted_forward_leaves_the_cache_as_it_was(monkeypatch, error, new_tokens):
    """An exception (or Ctrl-C) in the MLP of layer 2, after layers 0-2 wrote their keys and values: the cache
    holds what it held, and continuing from it gives the same logits as a run that was never interrupted."""
    model = tiny_model()
    ids = np.random.default_rng(1).integers(0, 50, 5 + new_tokens + 3)
    cache = model.new_cache()
    model.step(ids[:5], cache)
    before = [(layer.k.copy(), layer.v.copy(), layer.positions.copy()) for layer in cache.layers]

    calls = []

    def failing_mlp(*args):
        calls.append(1)
        if len(calls) == 3:
            raise error("stop")
        return mlp(*args)

    monkeypatch.setattr(model_module, "mlp", failing_mlp)
    with pytest.raises(error):
        model.step(ids[5:5 + new_tokens], cache)
    assert len(calls) == 3  # it did stop inside the pass
    monkeypatch.setattr(model_module, "mlp", mlp)

    assert cache.length == 5
    for layer, (k, v, positions) in zip(cache.layers, before):
        assert np.array_equal(layer.k, k) and np.array_equal(layer.v, v)
        assert np.array_equal(layer.positions, positions)
    rest = model.step(ids[5:], cache, last_only=False)
    assert rel_err(rest, model.forward(ids)[5:]) < 1e-5  # measured ~1e-7


def test_decode_writes_into_the_buffer_without_copying():
    """A decode step adds one row to each layer's buffer: what was cached stays where it was."""
    model = tiny_model()
    cache = model.new_cache()
    model.step([1, 2, 3, 4, 5], cache)
    global_layer = next(i for i in range(4) if model.config.layer_window(i) is None)
    held = cache.layers[global_layer].k
    model.step([6], cache)
    after = cache.layers[global_layer].k
    assert after.shape[1] == 6 and np.shares_memory(held, after)
    assert np.array_equal(after[:, :5], held)
    with pytest.raises(ValueError, match="cannot add position 9"):  # positions continue the cache, no gaps
        cache.layers[global_layer].update(np.zeros((1, 1, 8), np.float32), np.zeros((1, 1, 8), np.float32),
                                          np.array([9]))
