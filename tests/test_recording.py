"""Recording a forward pass (minigemma/recording.py): it changes nothing, works with the KV cache, and what it
keeps is what the model computed."""

from __future__ import annotations

import numpy as np
import pytest

from minigemma import kernels, recording
from minigemma.config import GemmaConfig
from minigemma.model import Gemma
from minigemma.recording import logit_lens, record_forward
from conftest import BACKENDS, TINY, random_params

# A Gemma 2 config: sandwich norms, a sliding window shorter than the sequence, both soft-caps
CONFIG = GemmaConfig.from_hf_dict({**TINY, "model_type": "gemma2", "sliding_window": 5,
                                   "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0})
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 12)


@pytest.fixture(scope="module")
def model():
    return Gemma(CONFIG, random_params(CONFIG, np.random.default_rng(1)))


def with_backend(model, backend: str) -> Gemma:
    """The same float32 model computing with another backend."""
    return Gemma(model.config, model.params, backend=kernels.get(backend))


def test_recording_on_gives_the_same_logits(model, backend):
    model = with_backend(model, backend)
    off = model.forward(IDS)
    with record_forward() as rec:
        on = model.forward(IDS)
    assert np.array_equal(on, off)
    assert np.array_equal(rec[None, "logits"], off)
    assert recording._recording is None  # off again after the block


def test_every_backend_records_the_same_steps(model):
    """The compiled attention never builds the probabilities; the recording recomputes them from q and k,
    so they are there, and agree, whichever backend ran."""
    recordings = {}
    for backend in BACKENDS:
        with record_forward() as recordings[backend]:
            with_backend(model, backend).forward(IDS)
    first, *others = recordings.values()
    for rec in others:
        assert rec.calls[0].keys() == first.calls[0].keys()
        for layer in range(CONFIG.num_hidden_layers):
            # measured 2.7e-7 (probabilities) and 3.6e-7 relative (residual stream): float32 summation order
            np.testing.assert_allclose(rec.attention_probs(layer), first.attention_probs(layer), atol=1e-5)
            scale = np.abs(first[layer, "resid"]).max()
            assert np.abs(rec[layer, "resid"] - first[layer, "resid"]).max() < 1e-5 * scale


def test_every_step_is_recorded_with_its_shape(model):
    c = CONFIG
    T, D, H, K, Dh = len(IDS), c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    with record_forward() as rec:
        model.forward(IDS)
    for name in ("attn_norm", "attn_out", "post_attn_norm", "resid_mid", "mlp_norm", "mlp_out", "post_mlp_norm",
                 "resid"):
        for layer in range(c.num_hidden_layers):
            assert rec[layer, name].shape == (T, D), (layer, name)
    assert rec[0, "q"].shape == (H, T, Dh) and rec[0, "k"].shape == rec[0, "v"].shape == (K, T, Dh)
    assert rec.attention_probs(0).shape == (H, T, T)
    assert rec.residual_stream().shape == (c.num_hidden_layers + 1, T, D)
    # the residual stream adds up: in = out of the previous block, mid = in + attention branch
    for layer in range(c.num_hidden_layers):
        before = rec.residual_stream()[layer]
        assert np.array_equal(rec[layer, "resid_mid"], before + rec[layer, "post_attn_norm"])
        assert np.array_equal(rec[layer, "resid"], rec[layer, "resid_mid"] + rec[layer, "post_mlp_norm"])


def test_attention_probs_rows_sum_to_one_inside_the_window(model):
    with record_forward() as rec:
        model.forward(IDS)
    for layer in range(CONFIG.num_hidden_layers):
        probs = rec.attention_probs(layer)
        window = CONFIG.layer_window(layer)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
        i, j = np.indices(probs.shape[1:])
        outside = (j > i) | ((i - j >= window) if window else False)
        assert np.all(probs[:, outside] == 0)  # nothing in the future, nothing beyond the window


def test_with_the_kv_cache_each_call_is_kept_and_matches_the_full_pass(model):
    """A prefill and decode steps are recorded call by call; a decode step's attention pattern over the
    positions it can see equals the last row of the full forward pass's."""
    with record_forward() as full:
        model.forward(IDS)
    cache = model.new_cache()
    with record_forward() as rec:
        model.step(IDS[:8], cache)
        for t in range(8, len(IDS)):
            model.step(IDS[t:t + 1], cache)
    assert len(rec.calls) == 1 + len(IDS) - 8
    for layer in range(CONFIG.num_hidden_layers):
        probs = rec.attention_probs(layer, call=-1)  # (H, 1, S): S is what the cache kept
        k_positions = rec[layer, "k_positions"]
        expected = full.attention_probs(layer)[:, -1:, k_positions]
        np.testing.assert_allclose(probs, expected, atol=1e-6)  # measured 1.2e-7
        np.testing.assert_allclose(rec[layer, "resid", -1], full[layer, "resid"][-1:], rtol=1e-5, atol=1e-5)


def test_logit_lens_of_the_last_stream_is_the_logits(model):
    with record_forward() as rec:
        logits = model.forward(IDS)
    lens = logit_lens(model, rec.residual_stream())  # (L + 1, T, V)
    assert lens.shape == (CONFIG.num_hidden_layers + 1, len(IDS), CONFIG.vocab_size)
    np.testing.assert_allclose(lens[-1], logits, rtol=1e-6, atol=1e-6)


def test_nested_recordings_are_refused_and_an_error_turns_recording_off(model):
    with pytest.raises(ValueError):
        with record_forward():
            model.forward([CONFIG.vocab_size])  # a bad token id
    assert recording._recording is None
    with record_forward():
        with pytest.raises(RuntimeError, match="nested"):
            with record_forward():
                pass
