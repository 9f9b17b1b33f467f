"""Gemma 4 text models and VaultGemma: tiny random checkpoints written by transformers, loaded by minigemma, logit
for logit against transformers, on both backends and in every storage type.

Each case covers a set of Gemma 4's new parts (config.py's docstring lists them). Then: the config styles, the
KV cache's per-layer shapes, the new layer functions one at a time against transformers' modules, GGUF files
written as llama.cpp's converter writes them (tests/gguf_convert.py), and `compare` naming the layer and step of
a bug injected into each new part.

Oracles: transformers' float32 forward pass on the same file (float32, bfloat16), or on minigemma's int8/int4
weights dequantized; minigemma's own safetensors path for GGUF files; transformers' generate() for greedy text.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import minigemma
from minigemma.config import FULL, SLIDING, GemmaConfig
from minigemma.generate import Sampling, generate_ids
from minigemma.kvcache import KVCache
from minigemma.params import LAYER_PREFIX, LAYER_TENSORS, MODEL_TENSORS
from minigemma.weights import dequantize
from conftest import hf_logits, load_hf_float32, make_hf_model, rel_err, save

SEQ = 24  # longer than every sliding window below (5)
S, F = SLIDING, FULL
P4 = {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
      "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 100_000.0}}

# name -> (model_type, overrides). Widths are whole groups of 32 wherever int8/int4 quantize along them.
CASES = {
    # dense Gemma 4: global layers with a larger head dim (32 vs 16) and one kv head, V = K (attention_k_eq_v),
    # proportional RoPE (a quarter of the pairs rotate), final soft-cap, no per-layer embeddings
    "gemma4-dense-keqv": ("gemma4_text", dict(
        layer_types=[S, F, S, F], sliding_window=5, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, hidden_size_per_layer_input=0, final_logit_softcapping=5.0, rope_parameters=P4)),
    # E-series: per-layer embeddings (P = 32), the last 3 of 7 layers share K/V (two sliding ones reuse layer 2's,
    # a global one layer 3's), and have a double-wide MLP
    "gemma4-eseries": ("gemma4_text", dict(
        num_hidden_layers=7, layer_types=[S, S, S, F, S, S, F], sliding_window=5, global_head_dim=32,
        hidden_size_per_layer_input=32, vocab_size_per_layer_input=160, num_kv_shared_layers=3,
        use_double_wide_mlp=True, rope_parameters=P4)),
    # MoE: 4 experts of width 32, 2 per token, beside the dense MLP
    "gemma4-moe": ("gemma4_text", dict(
        layer_types=[S, S, F, F], sliding_window=5, global_head_dim=32, hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32, rope_parameters=P4)),
    # VaultGemma: Gemma 2 without the post-attention and post-MLP norms
    "vaultgemma": ("vaultgemma", dict(sliding_window=5, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                                      query_pre_attn_scalar=24)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    model = make_hf_model(model_type, seed=len(request.param), head_dim=16, **overrides)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, SEQ)
    directory = save(copy.deepcopy(model), tmp_path_factory.mktemp(request.param) / "f32")
    return request.param, model, ids, directory


_oracle: dict = {}  # transformers' answers, computed once per case and storage and shared by both backends


def oracle(key, compute):
    if key not in _oracle:
        _oracle[key] = compute()
    return _oracle[key]


def dequantized_hf_model(hf_model, ours: minigemma.Gemma):
    """transformers' model with every matrix replaced by minigemma's stored one, dequantized: the oracle for
    int8/int4 storage (norms, layer scalars and router scales stay float32 on both sides)."""
    model = copy.deepcopy(hf_model)
    state = model.state_dict()
    c, p = ours.config, ours.params

    def put(name, w):
        if w is None or (not isinstance(w, list) and getattr(w, "ndim", 2) == 1):
            return
        value = np.stack([dequantize(m) for m in w]) if isinstance(w, list) else dequantize(w)
        assert tuple(state[name].shape) == value.shape, name
        state[name] = torch.from_numpy(np.ascontiguousarray(value))

    for s in MODEL_TENSORS:
        if s.when(c):
            put(s.hf, getattr(p, s.field))
    for i, layer in enumerate(p.layers):
        for s in LAYER_TENSORS:
            if s.when(c, i):
                put(LAYER_PREFIX["hf"].format(i) + s.hf, getattr(layer, s.field))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model


# Numba: float32, and int4 storage, which also holds int8 matrices (embedding, v_proj, some down_proj: storage_for),
# so both packed kernels run; the 16-bit kernels are the Gemma 1-3 ones, on the same shapes
@pytest.mark.parametrize("storage, backend", [("float32", "numpy"), ("bfloat16", "numpy"), ("int8", "numpy"),
                                              ("int4", "numpy"), ("float32", "numba"), ("int4", "numba")])
def test_logits_match_transformers(case, storage, backend):
    """float32 and bfloat16 files against transformers reading the same file; int8/int4 storage against
    transformers running minigemma's quantized weights dequantized. Relative error < 1e-5, same top-1."""
    name, model, ids, directory = case
    if storage == "bfloat16":
        directory = oracle((name, "bf16 directory"),
                           lambda: save(copy.deepcopy(model), directory.parent / "bf16", "bfloat16"))
    quantize = storage if storage in ("int8", "int4") else None
    ours = minigemma.load(directory, quantize=quantize, backend=backend)

    def transformers_logits():  # the same quantized weights on both backends (packed is a layout, same bytes)
        reference = load_hf_float32(directory)
        return hf_logits(dequantized_hf_model(reference, ours) if quantize else reference, ids)

    expected = oracle((name, storage), transformers_logits)
    logits = ours.forward(ids)
    assert logits.shape == (SEQ, model.config.vocab_size)
    assert rel_err(logits, expected) < 1e-5
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_greedy_continuation_and_cached_decoding(case, backend):
    """Cached decoding (a prefill, then one token at a time) equals the full forward pass, and the greedy
    continuation is transformers' own generate()."""
    name, model, ids, directory = case
    ours = minigemma.load(directory, backend=backend)
    full = ours.forward(ids)
    cache = ours.new_cache()
    steps = [ours.step(ids[:9], cache, last_only=False)] + [ours.step([t], cache) for t in ids[9:]]
    assert rel_err(np.concatenate(steps), full) < 1e-5

    prompt = ids[:8]
    text = list(generate_ids(ours, prompt, Sampling(max_new_tokens=10, ignore_eos=True)))

    def transformers_greedy():
        hf_model = copy.deepcopy(model)
        hf_model.generation_config.eos_token_id = None  # as ignore_eos: ten tokens whatever they are
        with torch.no_grad():
            out = hf_model.generate(torch.as_tensor(prompt)[None], max_new_tokens=10, do_sample=False,
                                    pad_token_id=0)
        return out[0, len(prompt):].tolist()

    assert text == oracle((name, "greedy"), transformers_greedy)


def test_each_new_part_matters(case):
    """Turning off any one of the case's Gemma 4 features changes the logits a lot: each is exercised."""
    name, model, ids, directory = case
    ours = minigemma.load(directory)
    c, base = ours.config, ours.forward(ids)
    if c.model_type != "gemma4_text":
        pytest.skip("VaultGemma adds nothing to switch off (test_logits_match_transformers covers it)")
    variants = {"plain RoPE on global layers": dataclasses.replace(c, rope={
        t: dataclasses.replace(r, partial_rotary_factor=1.0) for t, r in c.rope.items()})}
    if c.per_layer_embeddings:
        variants["no per-layer embeddings"] = dataclasses.replace(c, hidden_size_per_layer_input=0)
    if c.enable_moe_block:
        variants["top-1 routing"] = dataclasses.replace(c, top_k_experts=1)
    for what, other in variants.items():
        assert rel_err(minigemma.model.forward(ours.params, other, ids, KVCache(other)), base) > 1e-2, what
    no_scalars = copy.deepcopy(ours.params)
    for layer in no_scalars.layers:
        layer.layer_scalar = None
    assert rel_err(minigemma.model.forward(no_scalars, c, ids, KVCache(c)), base) > 1e-2


# ---- config styles ------------------------------------------------------------------------------------------

def test_config_styles_read_alike(case, tmp_path):
    """The per_layer_config transformers saves, the flat global_head_dim / num_global_key_value_heads of the
    published configs, and the multimodal config's text part all give the same config."""
    name, model, ids, directory = case
    saved = json.loads((directory / "config.json").read_text())
    config = GemmaConfig.from_hf_dict(saved)
    if saved["model_type"] != "gemma4_text":
        assert not config.sandwich_norms and config.attn_logit_softcapping == 3.0  # VaultGemma: a Gemma 2
        return
    assert GemmaConfig.from_hf_dict({"model_type": "gemma4", "text_config": saved}) == config
    global_layer = config.layer_types.index(FULL)
    assert config.layer_head_dim(global_layer) == 32 and config.layer_head_dim(0) == 16
    flat = {k: v for k, v in saved.items() if k != "per_layer_config"}
    flat["global_head_dim"] = 32
    if saved.get("attention_k_eq_v"):
        flat["num_global_key_value_heads"] = 1
    assert GemmaConfig.from_hf_dict(flat) == config


def test_config_matches_transformers(case):
    """Every per-layer value minigemma derives agrees with transformers' own modules."""
    name, model, ids, directory = case
    c = minigemma.load(directory).config
    assert c.num_parameters == model.num_parameters()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert c.layer_window(i) == attn.sliding_window
        if c.model_type != "gemma4_text":
            continue
        assert c.layer_head_dim(i) == attn.head_dim
        assert c.num_attention_heads // c.layer_kv_heads(i) == attn.num_key_value_groups
        assert c.kv_shared(i) == attn.is_kv_shared_layer
        assert c.layer_intermediate_size(i) == layer.mlp.intermediate_size
        assert c.has_v_proj(i) == (getattr(attn, "v_proj", None) is not None or attn.is_kv_shared_layer)


def test_kv_cache_holds_per_layer_shapes_and_nothing_for_shared_layers(case):
    """Each layer's cache has its own head dim and kv heads; KV-shared layers add no bytes."""
    name, model, ids, directory = case
    ours = minigemma.load(directory)
    c = ours.config
    cache = ours.new_cache()
    ours.step(ids, cache)
    held = {id(layer) for layer in cache.layers}
    assert len(held) == c.num_hidden_layers - c.num_kv_shared_layers
    for i, layer in enumerate(cache.layers):
        assert layer.k.shape[0] == c.layer_kv_heads(c.kv_source(i)) and layer.k.shape[2] == c.layer_head_dim(i)
    expected = sum(2 * 4 * len(layer._buf.k) * c.layer_kv_heads(i) * c.layer_head_dim(i)
                   for i, layer in enumerate(cache.layers) if c.kv_source(i) == i)
    assert cache.nbytes() == expected


# ---- the layer functions, one at a time ---------------------------------------------------------------------

def test_proportional_rope_matches_transformers():
    """Only the first partial_rotary_factor of the pairs rotate, with the full head dim's frequencies."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minigemma.layers import proportional_rope_angles

    hf = transformers.Gemma4TextConfig(num_hidden_layers=2, layer_types=[S, F], head_dim=16, global_head_dim=64,
                                       rope_parameters={**P4, "full_attention": {**P4["full_attention"],
                                                                                 "factor": 2.0}})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["proportional"](hf, "cpu", layer_type=F)
    positions = np.arange(50, 60)
    cos, sin = proportional_rope_angles(positions, 64, 100_000.0, 2.0, 0.25)
    angles = torch.as_tensor(positions)[:, None].float() * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    # an inv_freq may differ in its last float32 bit (torch's pow and NumPy's): ~1e-6 radians at position 60
    np.testing.assert_allclose(cos, emb.cos().numpy(), atol=1e-5)
    np.testing.assert_allclose(sin, emb.sin().numpy(), atol=1e-5)
    assert (cos[:, 8:32] == 1).all() and (sin[:, 8:32] == 0).all()  # 8 of 32 pairs rotate


def test_router_matches_transformers():
    """layers.route: norm, scale, softmax, top-k, renormalise, per-expert scale, as Gemma4TextRouter."""
    import transformers
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    from conftest import randomize_
    from minigemma.layers import route

    hf = transformers.Gemma4TextConfig(hidden_size=64, num_experts=8, top_k_experts=3)
    router = Gemma4TextRouter(hf)
    router.config = hf
    randomize_(router, seed=4)
    x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)
    with torch.no_grad():
        _, weights, index = router(torch.from_numpy(x))
    ours_w, ours_i = route(x, router.scale.detach().numpy(), router.proj.weight.detach().numpy(),
                           router.per_expert_scale.detach().numpy(), 3, hf.rms_norm_eps)
    order = np.argsort(ours_i, axis=-1)  # compare as sets of (expert, weight) per token
    theirs = np.argsort(index.numpy(), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(ours_i, order, -1), np.take_along_axis(index.numpy(), theirs, -1))
    np.testing.assert_allclose(np.take_along_axis(ours_w, order, -1),
                               np.take_along_axis(weights.numpy(), theirs, -1), rtol=1e-5, atol=1e-7)


# ---- GGUF --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_file_gives_the_safetensors_logits(case, qtype, tmp_path):
    """A gemma4 GGUF written as llama.cpp's Gemma4Model writes it (tests/gguf_convert.py) loads to the same
    config and logits as the safetensors directory; a Q8_0 file gives the logits of the directory holding the
    weights gguf's own dequantizer reads back from it."""
    from gguf import GGMLQuantizationType as Q
    from safetensors.numpy import save_file

    from gguf_convert import convert, dequantized, gguf_names

    name, model, ids, directory = case
    if model.config.model_type != "gemma4_text":
        pytest.skip("llama.cpp has no VaultGemma architecture")
    path = convert(model, tmp_path / "model.gguf", getattr(Q, qtype))
    loaded = minigemma.load(path)
    reference = minigemma.load(directory)
    assert described(loaded.config) == described(reference.config)
    with pytest.raises(minigemma.errors.ModelFileError, match="has no tokenizer"):  # its BPE vocabulary: not read
        loaded.tokenizer
    if qtype == "Q8_0":  # the safetensors path on gguf's dequantized weights
        weights = dequantized(path, gguf_names(model))
        (tmp_path / "dq").mkdir()
        save_file(weights, tmp_path / "dq" / "model.safetensors")
        (tmp_path / "dq" / "config.json").write_text((directory / "config.json").read_text())
        reference = minigemma.load(tmp_path / "dq")
    assert rel_err(loaded.forward(ids), reference.forward(ids)) < 1e-6


def described(c: GemmaConfig) -> dict:
    """What a config means, layer by layer (two files may spell the same model differently: a per_layer_config
    entry equal to the global value, an eps rounded to float32)."""
    fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
              if f.name not in ("extra", "per_layer_config", "rms_norm_eps")}
    per_layer = [(c.layer_head_dim(i), c.layer_kv_heads(i), c.has_v_proj(i), c.kv_source(i),
                  c.layer_intermediate_size(i), c.layer_window(i)) for i in range(c.num_hidden_layers)]
    return {**fields, "per_layer": per_layer, "eps": np.float32(c.rms_norm_eps)}


# ---- compare: where an injected bug in a new part starts ----------------------------------------------------

@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    """One tiny Gemma 4 with every new part at once: K=V global layers with their own head dim, proportional
    RoPE, per-layer embeddings, KV sharing with a double-wide MLP, MoE. (minigemma model, transformers, ids)"""
    hf = make_hf_model("gemma4_text", seed=11, head_dim=16, num_hidden_layers=5, layer_types=[S, F, S, S, F],
                       sliding_window=5, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                       hidden_size_per_layer_input=32, vocab_size_per_layer_input=160, num_kv_shared_layers=2,
                       use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2,
                       moe_intermediate_size=32, rope_parameters=P4)
    directory = save(copy.deepcopy(hf), tmp_path_factory.mktemp("everything"))
    return minigemma.load(directory), hf, np.random.default_rng(2).integers(0, 160, 12)


def test_compare_a_correct_gemma4_is_within_noise(everything):
    from minigemma.compare import compare

    ours, hf, ids = everything
    report = compare(ours, hf, ids)
    assert report.first_departure is None, report.format()
    steps = {(d.layer is None, d.step) for d in report.differences}
    assert {(True, "per_layer_inputs"), (False, "router"), (False, "moe_out"), (False, "per_layer_out")} <= steps
    assert "per_layer_inputs" in report.format()


def _no_renormalising(x, scale, proj, expert_scale, top_k, eps, linear, rms_norm):
    """The router without dividing the top-k probabilities by their sum."""
    from minigemma.layers import softmax

    D = x.shape[-1]
    probs = softmax(linear(rms_norm(x, np.zeros(D, np.float32), eps) * scale * np.float32(D**-0.5), proj))
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    return np.take_along_axis(probs, chosen, -1) * expert_scale[chosen], chosen


BUGS = {  # name -> (what to patch in minigemma.model, the replacement, where compare must say it starts)
    "no value norm": ("GemmaConfig.value_norm", False, (0, "v")),
    "proportional RoPE rotating every pair": (
        "proportional_rope_angles", lambda pos, dh, theta, factor, part: minigemma.layers.rope_angles(
            pos, dh, theta, factor), (1, "q")),
    "per-layer inputs without the 1/sqrt(2)": (
        "per_layer_inputs", lambda *a, **k: minigemma.layers.per_layer_inputs(*a, **k) * np.float32(2**0.5),
        (None, "per_layer_inputs")),
    "per-layer branch with exact GELU": (
        "per_layer_branch", lambda x, inp, gate, proj, norm, eps, linear, rms_norm: rms_norm(linear(
            torch.nn.functional.gelu(torch.from_numpy(linear(x, gate))).numpy() * inp, proj), norm, eps),
        (0, "per_layer_out")),
    "router without renormalising": ("route", _no_renormalising, (0, "router")),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_compare_names_where_a_bug_in_a_new_part_starts(everything, bug, monkeypatch):
    from minigemma.compare import compare

    ours, hf, ids = everything
    target, replacement, where = BUGS[bug]
    if target.startswith("GemmaConfig."):
        monkeypatch.setattr(GemmaConfig, target.split(".")[1], property(lambda self: replacement))
    else:
        monkeypatch.setattr(minigemma.model, target, replacement)
    first = compare(ours, hf, ids).first_departure
    assert first is not None and (first.layer, first.step) == where, first


def test_kv_cache_bytes_is_what_the_cache_holds(case):
    """kvcache.kv_cache_bytes (the --stats figure) equals the bytes of the keys and values a cache holds:
    per-layer shapes, sliding layers W - 1 positions, shared layers nothing."""
    from minigemma.kvcache import kv_cache_bytes

    name, model, ids, directory = case
    ours = minigemma.load(directory)
    cache = ours.new_cache()
    ours.step(ids, cache)
    held = {id(layer): layer for layer in cache.layers}.values()
    assert kv_cache_bytes(ours.config, len(ids)) == sum(layer.k.nbytes + layer.v.nbytes for layer in held)
    if ours.config.num_kv_shared_layers:  # the same model without sharing would hold more
        unshared = dataclasses.replace(ours.config, num_kv_shared_layers=0)
        assert kv_cache_bytes(unshared, len(ids)) > kv_cache_bytes(ours.config, len(ids))


def test_multimodal_checkpoint_loads_its_language_model(case, tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (config.json with text_config, tensors under
    model.language_model.) is the same text model. Built without its vision and audio towers, which minigemma
    would skip (hf.text_model_name)."""
    import transformers

    name, model, ids, directory = case
    if model.config.model_type != "gemma4_text":
        pytest.skip("VaultGemma has no multimodal form")
    mm = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(
        text_config=model.config.to_dict(), vision_config=None, audio_config=None))
    mm.model.language_model.load_state_dict(model.model.state_dict())
    save(mm.eval(), tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "gemma4"
    logits = minigemma.load(tmp_path / "mm").forward(ids)
    assert rel_err(logits, oracle((name, "float32"), lambda: hf_logits(model, ids))) < 1e-5


def test_compare_command_on_a_gemma4_checkpoint(tmp_path):
    """`python -m minigemma compare` on a Gemma 4 directory (with a SentencePiece tokenizer.model, built here
    from a small Gemma-shaped vocabulary): exit code 0, every step within noise, the new steps in the table."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from gguf_convert import vocabulary
    from minigemma.tokenizer import model_proto_from_gguf

    V = 288  # a loadable SentencePiece vocabulary needs the 256 byte pieces
    hf = make_hf_model("gemma4_text", seed=5, vocab_size=V, head_dim=16, num_hidden_layers=3, layer_types=[S, F, F],
                       sliding_window=5, global_head_dim=32, hidden_size_per_layer_input=32,
                       vocab_size_per_layer_input=V, num_kv_shared_layers=1, enable_moe_block=True, num_experts=4,
                       top_k_experts=2, moe_intermediate_size=32, rope_parameters=P4)
    directory = save(hf, tmp_path / "tiny")
    pieces, scores, types = vocabulary(V)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    fields = {k: SimpleNamespace(contents=lambda v=v: v) for k, v in meta.items()}
    (directory / "tokenizer.model").write_bytes(model_proto_from_gguf(SimpleNamespace(fields=fields))
                                                .SerializeToString())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "minigemma", "compare", "--model", str(directory), "--prompt",
                           "ab cd ef gh"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every step is within float32 noise" in done.stdout
    assert all(step in done.stdout for step in ("router", "moe_out", "per_layer_out", "per_layer_inputs"))


@pytest.mark.parametrize("change, message", [
    ({"per_layer_config": {"1": {"intermediate_size": 8}}}, "field 'intermediate_size' is not supported"),
    ({"per_layer_config": {"9": {"head_dim": 8}}}, "not a layer index in \\[0, 4\\)"),
    ({"num_kv_shared_layers": 3, "layer_types": [S, F, S, F]}, "needs an unshared layer of the same type"),
    ({"enable_moe_block": True, "num_experts": 4}, "enable_moe_block needs"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all'"),
    ({"rope_parameters": {F: {"rope_type": "yarn", "rope_theta": 1.0}, S: {"rope_theta": 1.0}}}, "'yarn'"),
])
def test_config_mistakes_are_named(change, message):
    """A Gemma 4 config minigemma cannot run faithfully is refused with the field named."""
    d = {"model_type": "gemma4_text", "num_hidden_layers": 4, "layer_types": [S, S, S, F], **change}
    with pytest.raises(ValueError, match=message):
        GemmaConfig.from_hf_dict(d)


def test_published_style_gemma4_defaults_are_transformers():
    """A bare Gemma 4 config gets transformers' Gemma4TextConfig defaults, per layer."""
    import transformers

    ours = GemmaConfig.from_hf_dict({"model_type": "gemma4_text"})
    theirs = transformers.Gemma4TextConfig()
    assert ours.layer_types == tuple(theirs.layer_types) and ours.num_hidden_layers == theirs.num_hidden_layers
    for i in range(ours.num_hidden_layers):
        assert ours.layer_head_dim(i) == theirs.per_layer_config[i].head_dim
        assert ours.layer_kv_heads(i) == theirs.per_layer_config[i].num_key_value_heads
    assert ours.rope[F].partial_rotary_factor == 0.25 and ours.hidden_size_per_layer_input == 256


def test_training_lowers_the_loss(case):
    """train.py has the backward of every new part (their gradients are checked against transformers in
    test_train.py and test_backward_gemma4.py): a few plain gradient steps of full fine-tuning on one batch
    lower its loss, on every case (the MoE's choice of experts may change between steps)."""
    from minigemma import train

    name, model, ids, directory = case
    ours = minigemma.load(directory)
    ours.params = copy.deepcopy(ours.params)  # writable: loading maps the file's float32 tensors read-only
    tokens = np.stack([ids[:12], ids[12:]])  # (2, 12)
    losses = []
    for _ in range(5):
        total, count, grads = train.loss_and_grads(ours, tokens, tokens, train="full")
        losses.append(total / count)
        for key, p in train.parameters(ours, "full").items():
            p -= 0.05 * grads[key] / count
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_token_past_the_per_layer_table_is_named(tmp_path):
    """An E-series model whose per-layer table has fewer rows than the vocabulary (the config allows it): a token
    id past the table is refused in one line naming the field, where an index would otherwise fail inside NumPy."""
    model_type, overrides = CASES["gemma4-eseries"]
    small = {**overrides, "vocab_size_per_layer_input": 100}
    model = minigemma.load(save(make_hf_model(model_type, seed=3, head_dim=16, **small), tmp_path))
    model.forward([1, 99])  # the last row of the table
    with pytest.raises(minigemma.errors.InvalidArgument, match="vocab_size_per_layer_input = 100"):
        model.forward([1, 100])
