"""Whole models: tiny random Gemma 1/2/3 checkpoints written by transformers, loaded by minigemma, logit for
logit against transformers' float32 forward pass."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import minigemma
from minigemma.hf import read_safetensors_header
from conftest import hf_logits, load_hf_float32, make_hf_model, rel_err, save, to_legacy_config

SEQ = 40  # longer than every sliding window below

# name -> (model_type, overrides). Each says what it is there to cover.
CASES = {
    # Gemma 1, multi-query attention as gemma-2b (K = 1)
    "gemma1-mqa": ("gemma", dict(num_key_value_heads=1)),
    # Gemma 1, multi-head as gemma-7b, with H * Dh (4 * 32 = 128) != D (64)
    "gemma1-mha-wide": ("gemma", dict(num_key_value_heads=4, head_dim=32)),
    # Gemma 2, grouped-query (4 heads, 2 kv), window 6 < SEQ, soft-caps small enough to bite
    "gemma2-gqa-softcap": ("gemma2", dict(sliding_window=6, attn_logit_softcapping=3.0,
                                          final_logit_softcapping=2.0, query_pre_attn_scalar=24)),
    # Gemma 3: 7 layers with pattern 3 (not a multiple), window 5, linear RoPE scaling on global layers,
    # distinct RoPE bases per layer type, QK-norm
    "gemma3-pattern-scaling": ("gemma3_text", dict(
        num_hidden_layers=7, sliding_window=5, sliding_window_pattern=3, num_key_value_heads=1,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 100_000.0, "factor": 4.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    model = make_hf_model(model_type, seed=len(request.param), **overrides)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, SEQ)
    return request.param, model, ids, tmp_path_factory.mktemp(request.param)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_logits_match_transformers(case, dtype):
    name, model, ids, tmp = case
    directory = save(copy.deepcopy(model), tmp / dtype, dtype)
    reference = load_hf_float32(directory)  # transformers computing in float32 from the stored weights
    expected = hf_logits(reference, ids)

    ours = minigemma.load(directory).forward(ids)

    assert ours.dtype == np.float32 and ours.shape == (SEQ, model.config.vocab_size)
    assert rel_err(ours, expected) < 1e-5
    assert np.array_equal(ours.argmax(-1), expected.argmax(-1))


def test_error_is_at_the_float32_floor(case):
    """Against a float64 run of transformers, our float32 error is no bigger than transformers' own float32
    error (times a small factor): we are as close to exact as float32 allows."""
    name, model, ids, tmp = case
    directory = save(copy.deepcopy(model), tmp / "f32-floor")
    exact = hf_logits(copy.deepcopy(model).double(), ids)
    theirs = rel_err(hf_logits(model, ids), exact)
    ours = rel_err(minigemma.load(directory).forward(ids), exact)
    assert ours < 3 * theirs + 1e-7


def test_legacy_config_style(case):
    """The legacy config.json style of published checkpoints loads to the same model in both libraries."""
    name, model, ids, tmp = case
    directory = save(copy.deepcopy(model), tmp / "legacy")
    legacy = to_legacy_config(directory)
    assert "rope_parameters" not in legacy and "layer_types" not in legacy
    expected = hf_logits(load_hf_float32(directory), ids)
    assert rel_err(minigemma.load(directory).forward(ids), expected) < 1e-5


def test_sharded_checkpoint(tmp_path):
    model = make_hf_model("gemma2", num_key_value_heads=1, sliding_window=6)
    directory = save(model, tmp_path, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    ids = np.arange(20) % model.config.vocab_size
    assert rel_err(minigemma.load(directory).forward(ids), hf_logits(model, ids)) < 1e-5


def test_softcaps_and_window_matter(case):
    """The features a case covers change the answer, so matching transformers above means something."""
    name, model, ids, tmp = case
    directory = save(copy.deepcopy(model), tmp / "matter")
    m = minigemma.load(directory)
    expected = hf_logits(model, ids)
    changes = {"sliding_window": None}
    if m.config.attn_logit_softcapping:
        changes = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
    if m.config.model_type == "gemma":
        changes = {"rms_norm_eps": 1.0}  # Gemma 1 has no window or caps: a wrong eps must show too
    if m.config.sliding_window is not None or changes != {"sliding_window": None}:
        m.config = dataclasses.replace(m.config, **changes)
        assert rel_err(m.forward(ids), expected) > 1e-3


def test_gemma3_multimodal_checkpoint(tmp_path):
    """Gemma 3 4B+ checkpoints are multimodal; the text model sits under a language_model prefix."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from conftest import TINY, randomize_

    text = Gemma3TextConfig(**{**TINY, "vocab_size": 300}, sliding_window=5,
                            rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                                                "factor": 8.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=299, boi_token_index=297, eoi_token_index=298)
    config._attn_implementation = "eager"
    model = randomize_(Gemma3ForConditionalGeneration(config), seed=3)
    model.save_pretrained(tmp_path)
    names = list(read_safetensors_header(tmp_path / "model.safetensors")[0])
    assert any("language_model." in n for n in names) and any("vision_tower." in n for n in names)

    ids = np.random.default_rng(0).integers(0, 290, 30)
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)[None]).logits[0].numpy()
    m = minigemma.load(tmp_path)
    assert m.config.model_type == "gemma3_text" and m.config.rope["full_attention"].factor == 8.0
    assert rel_err(m.forward(ids), expected) < 1e-5
