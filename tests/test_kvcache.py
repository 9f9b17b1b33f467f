"""Cached decoding equals the full forward pass, at every step, well past the sliding window."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_params, rel_err
from minigemma.config import GemmaConfig
from minigemma.model import Gemma


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
