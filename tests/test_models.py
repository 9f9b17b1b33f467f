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
from minigemma.config import FULL, SLIDING, Rope
from minigemma.hf import read_safetensors_header
from minigemma.model import Gemma
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


# What each case is there to exercise (the comments on CASES), checked below to change the logits.
CASE_FEATURES = {
    "gemma1-mqa": {"query scale"},
    "gemma1-mha-wide": {"query scale"},
    "gemma2-gqa-softcap": {"query scale", "attention soft-cap", "final soft-cap", "sliding window",
                           "sandwich norms"},
    "gemma3-pattern-scaling": {"query scale", "sliding window", "full_attention RoPE factor", "RoPE base per type",
                               "QK-norm", "sandwich norms"},
}


def _overriding(c, **properties):
    """c with derived properties (`qk_norm`, `sandwich_norms`) overridden: they follow from model_type, so
    dataclasses.replace cannot set them; a subclass can."""
    overrides = {name: property(lambda self, value=value: value) for name, value in properties.items()}
    altered = type(f"Altered{type(c).__name__}", (type(c),), overrides)
    return altered(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)})


def feature_variants(c) -> dict:
    """name -> c with only that feature changed, for every feature c has."""
    scalar = c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
    variants = {  # Gemma 2/3 scale by query_pre_attn_scalar, not head_dim; a port that mixes them up shows here
        "query scale": dataclasses.replace(c, query_pre_attn_scalar=c.head_dim if scalar != c.head_dim
                                           else 4 * c.head_dim)}
    if c.attn_logit_softcapping is not None:
        variants["attention soft-cap"] = dataclasses.replace(c, attn_logit_softcapping=None)
    if c.final_logit_softcapping is not None:
        variants["final soft-cap"] = dataclasses.replace(c, final_logit_softcapping=None)
    if c.sliding_window is not None:
        variants["sliding window"] = dataclasses.replace(c, sliding_window=None)  # sliding layers see everything
    for layer_type, rope in c.rope.items():
        if rope.factor != 1.0:
            variants[f"{layer_type} RoPE factor"] = dataclasses.replace(
                c, rope={**c.rope, layer_type: Rope(rope.theta, 1.0)})
    if c.rope[FULL].theta != c.rope[SLIDING].theta:  # Gemma 3: one base for all layers would be wrong
        variants["RoPE base per type"] = dataclasses.replace(
            c, rope={**c.rope, SLIDING: Rope(c.rope[FULL].theta, c.rope[SLIDING].factor)})
    if c.qk_norm:
        variants["QK-norm"] = _overriding(c, qk_norm=False)
    if c.sandwich_norms:
        variants["sandwich norms"] = _overriding(c, sandwich_norms=False)
    return variants


def test_each_feature_matters(case):
    """Each feature a case covers changes the answer on its own, so matching transformers above means the
    feature is implemented, not just that the tiny model cannot tell."""
    name, model, ids, tmp = case
    directory = save(copy.deepcopy(model), tmp / "matter")
    m = minigemma.load(directory)
    expected = hf_logits(model, ids)
    assert rel_err(m.forward(ids), expected) < 1e-5  # the unchanged model matches

    variants = feature_variants(m.config)
    assert set(variants) == CASE_FEATURES[name]
    errors = {feature: rel_err(Gemma(c, m.params).forward(ids), expected) for feature, c in variants.items()}
    assert all(err > 1e-3 for err in errors.values()), errors


@pytest.fixture(scope="module")
def multimodal():
    """A tiny random Gemma 3 multimodal model (text + SigLIP vision tower), and its text-only logits."""
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
    ids = np.random.default_rng(0).integers(0, 290, 30)
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)[None]).logits[0].numpy()
    return model, ids, expected


# Gemma 3 4B+ checkpoints are multimodal; the text model sits under a prefix that depends on who wrote them.
# transformers writes both: `save_original_format=True` (its default) reverses its load-time renaming
# (conversion_mapping.py, "llava") back to the original release's names, False keeps the names the model has
# in memory, which transformers 4.52 .. 4.x saved. Each layout gets the tied head added back under its own
# name, as checkpoints that store a copy of it have it (minigemma must recognise and skip it, not fail on it).
MULTIMODAL_LAYOUTS = {  # name -> (save_original_format, text prefix, head name, vision prefix)
    "original-release": (True, "language_model.model.", "language_model.lm_head.weight", "vision_tower."),
    "transformers-4.52": (False, "model.language_model.", "lm_head.weight", "model.vision_tower."),
}


@pytest.mark.parametrize("layout", list(MULTIMODAL_LAYOUTS))
def test_gemma3_multimodal_checkpoint(multimodal, layout, tmp_path):
    from safetensors.numpy import load_file, save_file
    from transformers import Gemma3ForConditionalGeneration

    model, ids, expected = multimodal
    original_format, text_prefix, head, vision_prefix = MULTIMODAL_LAYOUTS[layout]
    model.save_pretrained(tmp_path, save_original_format=original_format)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    assert head not in tensors  # tied: transformers doesn't store it
    tensors[head] = tensors[text_prefix + "embed_tokens.weight"].copy()
    save_file(tensors, path, metadata={"format": "pt"})

    names = list(read_safetensors_header(path)[0])
    in_memory = "model.language_model."  # the text model's names inside Gemma3ForConditionalGeneration
    assert ({n.removeprefix(text_prefix) for n in names if n.startswith(text_prefix)} ==
            {n.removeprefix(in_memory) for n in model.state_dict() if n.startswith(in_memory)})
    assert any(n.startswith(vision_prefix) for n in names)
    assert all(n.startswith((text_prefix, vision_prefix)) or "multi_modal_projector." in n or n == head
               for n in names)

    # transformers reads the file back to the same model, so the layout is one it knows
    reread = Gemma3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(reread(input_ids=torch.as_tensor(ids)[None]).logits[0].numpy(), expected) < 1e-6

    m = minigemma.load(tmp_path)
    assert m.config.model_type == "gemma3_text" and m.config.rope["full_attention"].factor == 8.0
    assert rel_err(m.forward(ids), expected) < 1e-5
