"""model.py against transformers, on both backends: `self_attention` and `block` against transformers' attention and
decoder-layer modules, then whole models (`forward`): tiny random Gemma 1/2/3 checkpoints written by transformers,
loaded by minigemma, logit for logit against transformers' float32 forward pass, in every storage type.

Tolerances as in test_layers.py (its module docstring)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from transformers.models.gemma import modeling_gemma as hf_gemma
from transformers.models.gemma2 import modeling_gemma2 as hf_gemma2
from transformers.models.gemma3 import modeling_gemma3 as hf_gemma3

import minigemma
from minigemma import kernels, layers, model
from minigemma.config import FULL, SLIDING, GemmaConfig, Rope
from minigemma.hf import read_safetensors_header
from minigemma.kvcache import KVCache
from minigemma.model import Gemma
from minigemma.params import LayerParams
from conftest import hf_logits, load_hf_float32, make_hf_model, randomize_, rel_err, save, to_legacy_config
from test_layers import RTOL, assert_close, np_, t

# ---- self_attention and block against transformers' modules, on both backends ---------------------------------

TINY = dict(vocab_size=32, hidden_size=64, intermediate_size=96, max_position_embeddings=512)

# name -> (transformers config class, config kwargs, layer index). Each says what it is there to cover.
ATTN_CASES = {
    # Gemma 1 multi-head (K = H, as gemma-7b) with H * Dh = 128 != D = 64
    "gemma1-mha": (transformers.GemmaConfig, dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                                  num_hidden_layers=1), 0),
    # Gemma 1 multi-query (K = 1, as gemma-2b)
    "gemma1-mqa": (transformers.GemmaConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                                  num_hidden_layers=1), 0),
    # Gemma 2 grouped-query, sliding layer 0 (window 4 < T), soft-cap 2.0 small enough to bite, and a
    # query_pre_attn_scalar that is not head_dim
    "gemma2-sliding-softcap": (transformers.Gemma2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2, sliding_window=4,
        attn_logit_softcapping=2.0, query_pre_attn_scalar=24), 0),
    # Gemma 2 global layer 1
    "gemma2-full": (transformers.Gemma2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2, sliding_window=4,
        attn_logit_softcapping=2.0), 1),
    # Gemma 3: QK-norm; sliding layer with base 1e4
    "gemma3-sliding": (transformers.Gemma3TextConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, num_hidden_layers=2, sliding_window=5,
        layer_types=[SLIDING, FULL],
        rope_parameters={FULL: {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}}), 0),
    # Gemma 3 global layer: base 1e6 and linear scaling x8
    "gemma3-full-linear": (transformers.Gemma3TextConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2, sliding_window=5,
        layer_types=[SLIDING, FULL],
        rope_parameters={FULL: {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}}), 1),
}

HF_MODULES = {  # config class -> (attention, decoder layer, rotary embedding)
    transformers.GemmaConfig: (hf_gemma.GemmaAttention, hf_gemma.GemmaDecoderLayer, hf_gemma.GemmaRotaryEmbedding),
    transformers.Gemma2Config: (hf_gemma2.Gemma2Attention, hf_gemma2.Gemma2DecoderLayer,
                                hf_gemma2.Gemma2RotaryEmbedding),
    transformers.Gemma3TextConfig: (hf_gemma3.Gemma3Attention, hf_gemma3.Gemma3DecoderLayer,
                                    hf_gemma3.Gemma3RotaryEmbedding),
}


def hf_setup(name, **changes):
    """The transformers config, our config built from its dict, and the layer index."""
    config_cls, kwargs, layer = ATTN_CASES[name]
    hf_config = config_cls(**TINY, **{**kwargs, **changes}, attn_implementation="eager")
    return hf_config, GemmaConfig.from_hf_dict(hf_config.to_dict()), layer


def hf_position_embeddings(hf_config, layer, positions, x):
    rotary = HF_MODULES[type(hf_config)][2](hf_config)
    pos = torch.as_tensor(positions)[None]
    if isinstance(hf_config, transformers.Gemma3TextConfig):
        return rotary(x, pos, hf_config.layer_types[layer])
    return rotary(x, pos)


def additive_mask(positions, window) -> torch.Tensor:
    """(1, 1, T, T) float mask, 0 where allowed and float32's most negative value elsewhere (as transformers'
    eager masks), built from the definition: j <= i, and i - W < j on sliding layers."""
    i, j = np.asarray(positions)[:, None], np.asarray(positions)[None, :]
    allowed = (j <= i) & ((j > i - window) if window is not None else True)
    return torch.where(torch.as_tensor(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]


def our_rope(c: GemmaConfig, layer: int, positions):
    r = c.layer_rope(layer)
    return layers.rope_angles(positions, c.head_dim, r.theta, r.factor)


DUMMY = np.zeros(0, np.float32)


def attention_params(attn) -> dict:
    out = {f: np_(getattr(attn, f).weight) for f in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if hasattr(attn, "q_norm"):
        out |= {"q_norm": np_(attn.q_norm.weight), "k_norm": np_(attn.k_norm.weight)}
    return out


T_SEQ = 12


def attention_outputs(hf_config, c: GemmaConfig, layer: int, positions, seed: int, backend: str = "numpy"):
    """(ours, transformers') attention output for the same random weights and input."""
    attn = randomize_(HF_MODULES[type(hf_config)][0](hf_config, layer), seed=seed)
    assert c.layer_window(layer) == getattr(attn, "sliding_window", None)  # same layer kind on both sides
    x = np.random.default_rng(seed).standard_normal((len(positions), c.hidden_size)).astype(np.float32)
    with torch.no_grad():
        xt = t(x)[None]
        ref, _ = attn(xt, position_embeddings=hf_position_embeddings(hf_config, layer, positions, xt),
                      attention_mask=additive_mask(positions, c.layer_window(layer)))
    p = LayerParams(input_norm=DUMMY, pre_mlp_norm=DUMMY, gate_proj=DUMMY, up_proj=DUMMY, down_proj=DUMMY,
                    **attention_params(attn))
    ours = model.self_attention(x, p, c, kernels.get(backend), layer, our_rope(c, layer, positions),
                                c.layer_window(layer), KVCache(c).layers[layer], positions)
    return ours, ref[0].numpy()


@pytest.mark.parametrize("start", [0, 37])  # positions need not start at 0: RoPE and mask use absolute ones
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_self_attention_matches_transformers(name, start, backend):
    hf_config, c, layer = hf_setup(name)
    ours, ref = attention_outputs(hf_config, c, layer, np.arange(start, start + T_SEQ), seed=len(name),
                                  backend=backend)
    assert ours.dtype == np.float32
    assert_close(ours, ref)


def test_gemma3_attention_ignores_attn_logit_softcapping_as_transformers_does():
    hf_config, c, layer = hf_setup("gemma3-sliding", attn_logit_softcapping=2.0)
    assert hf_config.attn_logit_softcapping == 2.0
    ours, ref = attention_outputs(hf_config, c, layer, np.arange(T_SEQ), seed=12)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", ["gemma2-sliding-softcap", "gemma3-sliding", "gemma1-mqa"])
def test_self_attention_in_two_calls_matches_transformers(name, backend):
    """Prefill 7 tokens, then 5 more through the same KV cache: the continuation's queries start at position
    7 and (on sliding layers) see keys the cache has trimmed to its window. Compared with transformers on the
    whole sequence at once."""
    hf_config, c, layer = hf_setup(name)
    attn = randomize_(HF_MODULES[type(hf_config)][0](hf_config, layer), seed=7)
    positions = np.arange(T_SEQ)
    x = np.random.default_rng(8).standard_normal((T_SEQ, c.hidden_size)).astype(np.float32)
    with torch.no_grad():
        xt = t(x)[None]
        ref, _ = attn(xt, position_embeddings=hf_position_embeddings(hf_config, layer, positions, xt),
                      attention_mask=additive_mask(positions, c.layer_window(layer)))
    ref = ref[0].numpy()

    p = LayerParams(input_norm=DUMMY, pre_mlp_norm=DUMMY, gate_proj=DUMMY, up_proj=DUMMY, down_proj=DUMMY,
                    **attention_params(attn))
    cache = KVCache(c)
    parts = []
    for s in (slice(0, 7), slice(7, T_SEQ)):
        parts.append(model.self_attention(x[s], p, c, kernels.get(backend), layer, our_rope(c, layer, positions[s]),
                                          c.layer_window(layer), cache.layers[layer], positions[s]))
        cache.length += len(positions[s])  # commit, as model.forward does
    assert_close(np.concatenate(parts), ref)


def test_softcap_and_window_change_attention():
    """The Gemma 2 case above would not notice a missing soft-cap or window if they had no effect on it."""
    hf_config, c, layer = hf_setup("gemma2-sliding-softcap")
    attn = randomize_(hf_gemma2.Gemma2Attention(hf_config, layer), seed=9)
    p = LayerParams(input_norm=DUMMY, pre_mlp_norm=DUMMY, gate_proj=DUMMY, up_proj=DUMMY, down_proj=DUMMY,
                    **attention_params(attn))
    positions = np.arange(T_SEQ)
    x = np.random.default_rng(9).standard_normal((T_SEQ, c.hidden_size)).astype(np.float32)
    rope = our_rope(c, layer, positions)
    ops = kernels.NUMPY
    base = model.self_attention(x, p, c, ops, layer, rope, c.layer_window(layer), KVCache(c).layers[layer], positions)
    no_cap = dataclasses.replace(c, attn_logit_softcapping=None)
    no_window = dataclasses.replace(c, layer_types=(FULL,) * c.num_hidden_layers)
    for other in (no_cap, no_window):
        diff = model.self_attention(x, p, other, ops, layer, rope, other.layer_window(layer),
                                    KVCache(other).layers[layer], positions) - base
        assert np.max(np.abs(diff)) > 1e3 * RTOL * np.max(np.abs(base))


def block_params(layer_module, version: int) -> LayerParams:
    """Our LayerParams from a transformers decoder layer, mapping the norms by what they do: in Gemma 1
    `post_attention_layernorm` is the norm before the MLP; in Gemma 2/3 it norms the attention output."""
    m = layer_module
    mlp = {f: np_(getattr(m.mlp, f).weight) for f in ("gate_proj", "up_proj", "down_proj")}
    common = dict(input_norm=np_(m.input_layernorm.weight), **attention_params(m.self_attn), **mlp)
    if version == 1:
        return LayerParams(pre_mlp_norm=np_(m.post_attention_layernorm.weight), **common)
    return LayerParams(post_attn_norm=np_(m.post_attention_layernorm.weight),
                       pre_mlp_norm=np_(m.pre_feedforward_layernorm.weight),
                       post_mlp_norm=np_(m.post_feedforward_layernorm.weight), **common)


@pytest.mark.parametrize("name,version", [("gemma1-mha", 1), ("gemma1-mqa", 1), ("gemma2-sliding-softcap", 2),
                                          ("gemma2-full", 2), ("gemma3-sliding", 3), ("gemma3-full-linear", 3)])
def test_block_matches_transformers(name, version, backend):
    hf_config, c, layer = hf_setup(name)
    decoder = randomize_(HF_MODULES[type(hf_config)][1](hf_config, layer), seed=10 + version)
    assert c.sandwich_norms == (version > 1) and c.qk_norm == (version == 3)
    positions = np.arange(5, 5 + T_SEQ)
    x = np.random.default_rng(11).standard_normal((T_SEQ, c.hidden_size)).astype(np.float32) * 3
    with torch.no_grad():
        xt = t(x)[None]
        ref = decoder(xt, position_embeddings=hf_position_embeddings(hf_config, layer, positions, xt),
                      attention_mask=additive_mask(positions, c.layer_window(layer)),
                      position_ids=torch.as_tensor(positions)[None])
    ref = (ref[0] if isinstance(ref, tuple) else ref)[0].numpy()

    ours = model.block(x, block_params(decoder, version), c, kernels.get(backend), layer,
                       our_rope(c, layer, positions), c.layer_window(layer), KVCache(c).layers[layer], positions)
    assert ours.dtype == np.float32
    assert_close(ours, ref)
    # the block is residual: the output is not just its input
    assert np.max(np.abs(ours - x)) > 1e-2



# ---- whole models -------------------------------------------------------------------------------------------

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
def test_logits_match_transformers(case, dtype, backend):
    name, model, ids, tmp = case
    directory = tmp / dtype
    if not directory.exists():
        save(copy.deepcopy(model), directory, dtype)
    reference = load_hf_float32(directory)  # transformers computing in float32 from the stored weights
    expected = hf_logits(reference, ids)

    ours = minigemma.load(directory, dtype=None if dtype == "float32" else dtype, backend=backend)

    assert ours.backend.name == backend
    logits = ours.forward(ids)
    assert logits.dtype == np.float32 and logits.shape == (SEQ, model.config.vocab_size)
    assert rel_err(logits, expected) < 1e-5
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))


def transformers_on(hf_model, params, config) -> torch.nn.Module:
    """A copy of transformers' model whose matrices are minigemma's stored weights, dequantized: the oracle
    for a quantized load, which must compute what float32 computes on those weights."""
    from minigemma.params import LAYER_PREFIX, layer_specs, model_specs
    from minigemma.weights import dequantize

    hf_model = copy.deepcopy(hf_model)
    state = hf_model.state_dict()
    with torch.no_grad():
        for spec in model_specs(config):
            w = getattr(params, spec.field)
            state[spec.hf].copy_(torch.from_numpy(np.array(dequantize(w))))  # (a copy: file views are read-only)
        for i, layer in enumerate(params.layers):
            for spec in layer_specs(config, i):
                w = getattr(layer, spec.field)
                if len(w.shape) == 2:
                    state[LAYER_PREFIX["hf"].format(i) + spec.hf].copy_(torch.from_numpy(dequantize(w)))
    return hf_model.eval()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_logits_match_transformers_on_the_same_weights(case, quantize, backend):
    """int8/int4 (packed for Numba) against transformers run on the dequantized weights: the same function,
    so all of quantization's error is in the weights, none in the arithmetic."""
    name, model, ids, tmp = case
    directory = tmp / "float32"
    if not directory.exists():
        save(copy.deepcopy(model), directory)
    ours = minigemma.load(directory, quantize=quantize, backend=backend)
    expected = hf_logits(transformers_on(model, ours.params, ours.config), ids)
    logits = ours.forward(ids)
    assert rel_err(logits, expected) < 1e-5
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))
    assert rel_err(logits, hf_logits(model, ids)) > 1e-4  # and it is not the float32 model: weights did change


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
