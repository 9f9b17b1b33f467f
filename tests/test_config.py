"""GemmaConfig against transformers' own reading of the same config.json dicts.

The five published configs (legacy style, as the checkpoints carry them) are parsed by both libraries; everything
minigemma derives (layer types, attention scale, RoPE per layer, windows, soft-caps, parameter count) must be
what transformers derives. transformers' config classes and, where a value only exists on a module (the
attention `scaling`, `sliding_window`), the modules themselves built on the meta device, are the oracle.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from minigemma.config import FULL, SLIDING, GemmaConfig, Rope
from minigemma.layers import rope_angles
from conftest import CONFIG_DIR  # minigemma/configs: the published config.json files

# name -> the parameter count as the issue gives it (rounded)
PUBLISHED = {"gemma-2b": "2.51B", "gemma-7b": "8.54B", "gemma-2-2b": "2.61B", "gemma-3-270m": "268M",
             "gemma-3-1b": "1.00B"}


def read(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def hf_config(d: dict):
    """transformers' config for a config.json dict (AutoConfig dispatches on model_type)."""
    return transformers.AutoConfig.for_model(**copy.deepcopy(d))


ATTENTION_CLASSES = {
    "gemma": transformers.models.gemma.modeling_gemma.GemmaAttention,
    "gemma2": transformers.models.gemma2.modeling_gemma2.Gemma2Attention,
    "gemma3_text": transformers.models.gemma3.modeling_gemma3.Gemma3Attention,
}


def hf_attention_layers(cfg):
    """transformers' attention module of every layer, on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return [ATTENTION_CLASSES[cfg.model_type](cfg, i) for i in range(cfg.num_hidden_layers)]


def expected_rope(cfg) -> dict[str, Rope]:
    """RoPE per layer type as transformers has it in `rope_parameters` (nested per type on Gemma 3)."""
    params = cfg.rope_parameters
    per_type = params if FULL in params else {FULL: params, SLIDING: params}
    return {t: Rope(theta=p["rope_theta"], factor=p["factor"] if p["rope_type"] == "linear" else 1.0)
            for t, p in per_type.items()}


def assert_matches_transformers(c: GemmaConfig, cfg):
    """Every field and derived value of our config equals transformers' reading of the same dict."""
    assert c.model_type == cfg.model_type
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
              "pad_token_id"):
        assert getattr(c, f) == getattr(cfg, f), f
    eos = cfg.eos_token_id
    assert c.eos_token_id == (tuple(eos) if isinstance(eos, list) else (eos,))
    assert c.attn_logit_softcapping == getattr(cfg, "attn_logit_softcapping", None)
    assert c.final_logit_softcapping == getattr(cfg, "final_logit_softcapping", None)

    # Gemma 1 has no layer_types in transformers: every layer is full attention
    assert c.layer_types == tuple(getattr(cfg, "layer_types", None) or [FULL] * cfg.num_hidden_layers)
    assert c.rope == expected_rope(cfg)

    attns = hf_attention_layers(cfg)
    for i, attn in enumerate(attns):
        assert c.attn_scale == pytest.approx(attn.scaling, rel=1e-12), i
        assert c.layer_window(i) == getattr(attn, "sliding_window", None), i
        assert c.layer_rope(i) == c.rope[c.layer_types[i]]
    # and the scale as transformers computes it (query_pre_attn_scalar on Gemma 2/3, head_dim on Gemma 1)
    scalar = cfg.head_dim if cfg.model_type == "gemma" else cfg.query_pre_attn_scalar
    assert c.attn_scale == pytest.approx(scalar**-0.5, rel=1e-12)


@pytest.fixture(scope="module", params=list(PUBLISHED))
def published(request):
    name = request.param
    d = read(name)
    cfg = hf_config(d)
    with torch.device("meta"):  # shapes only: counting 8.5B parameters costs no memory
        hf_model = transformers.AutoModelForCausalLM.from_config(cfg)
    return name, d, cfg, hf_model


def test_published_config_matches_transformers(published):
    name, d, cfg, _ = published
    c = GemmaConfig.from_json(CONFIG_DIR / f"{name}.json")
    assert c == GemmaConfig.from_hf_dict(d)
    assert_matches_transformers(c, cfg)
    # the layer patterns, by their definition: Gemma 1 all global, Gemma 2 alternating from a local layer 0,
    # Gemma 3 every sixth layer global
    n = c.num_hidden_layers
    pattern = {"gemma": None, "gemma2": 2, "gemma3_text": 6}[c.model_type]
    assert c.layer_types == tuple(FULL if pattern is None or i % pattern == pattern - 1 else SLIDING
                                  for i in range(n))


def test_parameter_count(published):
    name, d, cfg, hf_model = published
    c = GemmaConfig.from_json(CONFIG_DIR / f"{name}.json")
    assert c.num_parameters == hf_model.num_parameters()
    figure = PUBLISHED[name]
    if figure.endswith("B"):
        assert f"{c.num_parameters / 1e9:.2f}B" == figure
    else:
        assert f"{c.num_parameters / 1e6:.0f}M" == figure


# ---- legacy and current config.json styles ---------------------------------------------------------------

LEGACY_KEYS = ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern",
               "_sliding_window_pattern")


def current_style(d: dict) -> dict:
    """The dict transformers writes today for the same config: rope_parameters and layer_types, with the
    legacy keys dropped so that only the current ones can be read."""
    current = hf_config(d).to_dict()
    for k in LEGACY_KEYS:
        current.pop(k, None)
    assert "rope_parameters" in current
    return current


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-270m", "gemma-3-1b", "gemma-2b"])
def test_legacy_and_current_styles_agree(name):
    legacy = read(name)
    current = current_style(legacy)
    if legacy["model_type"] != "gemma":
        assert "layer_types" in current and "layer_types" not in legacy
    c_legacy, c_current = GemmaConfig.from_hf_dict(legacy), GemmaConfig.from_hf_dict(current)
    assert c_legacy == c_current
    assert_matches_transformers(c_current, hf_config(current))


def gemma3_4b_style() -> dict:
    """gemma-3-1b's config with gemma-3-4b's linear RoPE scaling (factor 8), window and width."""
    d = read("gemma-3-1b")
    d.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=1024, hidden_size=2560,
             intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4)
    return d


def test_gemma3_linear_scaling_is_for_global_layers_only():
    legacy = gemma3_4b_style()
    cfg = hf_config(legacy)
    c = GemmaConfig.from_hf_dict(legacy)
    assert c == GemmaConfig.from_hf_dict(current_style(legacy))
    assert_matches_transformers(c, cfg)
    assert c.rope[FULL] == Rope(theta=legacy["rope_theta"], factor=8.0)
    assert c.rope[SLIDING] == Rope(theta=legacy["rope_local_base_freq"], factor=1.0)
    for i in range(c.num_hidden_layers):
        assert c.layer_rope(i).factor == (8.0 if c.layer_types[i] == FULL else 1.0)

    # and the frequencies themselves: at position 1 the RoPE angle is inv_freq, against transformers'
    # per-layer-type inv_freq (float32 pow on both sides may differ by an ulp: rtol 1e-6)
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(cfg)
    for layer_type, r in c.rope.items():
        _, sin = rope_angles(np.array([1]), c.head_dim, r.theta, r.factor)
        angle = np.arcsin(sin[0, : c.head_dim // 2].astype(np.float64))  # all angles < pi/2
        np.testing.assert_allclose(angle, getattr(rotary, f"{layer_type}_inv_freq").numpy(), rtol=1e-6)


def test_multimodal_gemma3_dict_gives_its_text_config():
    """Gemma 3 4b+ checkpoints are `gemma3` (multimodal): the language model is `text_config`, which lists only
    what differs from the Gemma 3 defaults (the rest comes from transformers' defaults)."""
    text = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024}
    d = {"model_type": "gemma3", "text_config": text, "vision_config": {"model_type": "siglip_vision_model"},
         "mm_tokens_per_image": 256}
    cfg = hf_config(d)
    assert cfg.model_type == "gemma3"
    c = GemmaConfig.from_hf_dict(d)
    assert c.model_type == "gemma3_text"
    assert_matches_transformers(c, cfg.text_config)
    assert c == GemmaConfig.from_hf_dict(text)  # the same as reading text_config alone


def test_gemma3_layer_count_not_a_multiple_of_the_pattern():
    d = {**read("gemma-3-270m"), "num_hidden_layers": 8, "sliding_window_pattern": 6}
    cfg = hf_config(d)
    c = GemmaConfig.from_hf_dict(d)
    assert_matches_transformers(c, cfg)
    assert c.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 2
    assert c == GemmaConfig.from_hf_dict(current_style(d))


def test_gemma2_with_a_different_query_scalar_and_softcaps():
    """The 27B-style query_pre_attn_scalar (144 != head_dim) and soft-caps come through as transformers has
    them: a config that used head_dim would give 1/16 instead of 1/12."""
    d = {**read("gemma-2-2b"), "query_pre_attn_scalar": 144, "attn_logit_softcapping": 20.0,
         "final_logit_softcapping": 15.0, "eos_token_id": [1, 107]}
    c = GemmaConfig.from_hf_dict(d)
    assert_matches_transformers(c, hf_config(d))
    assert c.attn_scale != c.head_dim**-0.5


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,offending", [
    ({"model_type": "llama"}, "llama"),
    ({"hidden_act": "relu"}, "relu"),  # Gemma 1 reads hidden_act
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "yarn"),
])
def test_bad_gemma1_dict_raises_naming_the_value(change, offending):
    d = {**read("gemma-2b"), **change}
    with pytest.raises(ValueError, match=offending):
        GemmaConfig.from_hf_dict(d)


@pytest.mark.parametrize("name,change,offending", [
    ("gemma-2-2b", {"hidden_activation": "relu"}, "relu"),
    ("gemma-3-1b", {"hidden_activation": "silu"}, "silu"),
    ("gemma-3-1b", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn"),
    ("gemma-3-1b", {"rope_scaling": {"type": "dynamic", "factor": 8.0}}, "dynamic"),
    ("gemma-3-1b", {"model_type": "gemma3n_text"}, "gemma3n_text"),
])
def test_bad_dict_raises_naming_the_value(name, change, offending):
    d = {**read(name), **change}
    with pytest.raises(ValueError, match=offending):
        GemmaConfig.from_hf_dict(d)


def test_gemma1_activation_is_read_from_hidden_act():
    d = {**read("gemma-2b"), "hidden_act": "relu", "hidden_activation": "gelu_pytorch_tanh"}
    assert hf_config(d).hidden_act == "relu"  # what transformers' GemmaMLP will run (ACT2FN[hidden_act])
    with pytest.raises(ValueError, match="relu"):
        GemmaConfig.from_hf_dict(d)


def test_current_style_yarn_on_one_layer_type_raises():
    current = current_style(read("gemma-3-1b"))
    current["rope_parameters"][SLIDING] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="yarn"):
        GemmaConfig.from_hf_dict(current)


def test_from_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ValueError, match="nowhere"):
        GemmaConfig.from_json(missing)

    malformed = tmp_path / "malformed" / "config.json"
    malformed.parent.mkdir()
    malformed.write_text('{"model_type": "gemma", "hidden_size": ')  # truncated
    with pytest.raises(ValueError, match="malformed"):
        GemmaConfig.from_json(malformed)

    wrong = tmp_path / "wrong" / "config.json"
    wrong.parent.mkdir()
    wrong.write_text(json.dumps({**read("gemma-2b"), "model_type": "llama"}))
    with pytest.raises(ValueError, match="llama") as e:
        GemmaConfig.from_json(wrong)
    assert str(wrong) in str(e.value)

    relu = tmp_path / "relu" / "config.json"
    relu.parent.mkdir()
    relu.write_text(json.dumps({**read("gemma-2b"), "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="relu") as e:
        GemmaConfig.from_json(relu)
    assert str(relu) in str(e.value)


@pytest.mark.parametrize("content", ["null", "[]", '"gemma"'])
def test_from_json_non_object_names_the_file(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(tmp_path)):
        GemmaConfig.from_json(path)


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b"])
def test_exact_gelu_on_gemma2_and_3_is_refused(name):
    """On Gemma 2/3 transformers runs hidden_activation "gelu" as exact (erf) GELU, not Gemma's tanh GELU;
    rather than silently compute something else, minigemma refuses it. (Gemma 1's "gelu" means tanh.)"""
    import transformers

    d = {**read(name), "hidden_activation": "gelu"}
    hf_act = transformers.activations.ACT2FN["gelu"]
    x = torch.linspace(-3, 3, 7)
    assert not torch.allclose(hf_act(x), transformers.activations.ACT2FN["gelu_pytorch_tanh"](x), atol=1e-4)
    with pytest.raises(ValueError, match="'gelu' is not supported"):
        GemmaConfig.from_hf_dict(d)
