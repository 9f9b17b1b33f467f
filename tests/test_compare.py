"""`compare` (minigemma/compare.py): a correct model is within float32 noise everywhere; a model with one
classic porting bug injected departs exactly at the layer and step where the bug is.

The bugs are injected into minigemma's functions with monkeypatch (undone after each test); transformers,
untouched, is the reference. docs/gotchas.md links here.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest

import minigemma
from minigemma import kernels, layers
from minigemma.compare import compare
from minigemma.config import FULL, SLIDING
from minigemma.model import Gemma
from minigemma.recording import record_forward
from conftest import TINY, make_hf_model, on_backend, save
from test_model import _overriding

SEQ = 12

MODELS = {  # name -> (model_type, overrides)
    "gemma1": ("gemma", dict(num_key_value_heads=1)),
    # a soft-cap small enough that a masked score capped to -cap instead of -inf gets real weight
    "gemma2": ("gemma2", dict(sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=5.0)),
    "gemma3": ("gemma3_text", dict(sliding_window=6, sliding_window_pattern=2, num_key_value_heads=1)),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(minigemma model, transformers model, token ids) for one of MODELS, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, overrides = MODELS[name]
            hf = make_hf_model(model_type, seed=7, **overrides)
            directory = save(copy.deepcopy(hf), tmp_path_factory.mktemp(name))
            ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, SEQ)
            cache[name] = minigemma.load(directory), hf, ids
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_a_correct_model_is_within_noise_everywhere(pair, name, backend):
    ours, hf, ids = pair(name)
    ours = on_backend(ours, backend)
    report = compare(ours, hf, ids)
    assert report.first_departure is None, report.format()
    # well inside the threshold (3e-5): measured <= 2.2e-6 with the NumPy backend, <= 3.6e-6 with Numba's (its
    # RMSNorm sums in another order; attention probabilities amplify a last-bit change in a norm the most)
    assert max(d.rel_diff for d in report.differences) < report.threshold / 4
    steps = {d.step for d in report.differences}
    assert {"embed", "attn_norm", "q", "k", "v", "probs", "attn_out", "resid_mid", "mlp_norm", "mlp_out",
            "resid", "final_norm", "logits"} <= steps
    assert ({"post_attn_norm", "post_mlp_norm"} <= steps) == (name != "gemma1")  # sandwich norms
    assert len(report.lens) == ours.config.num_hidden_layers + 1
    assert report.lens[-1][0] == report.lens[-1][1]  # the last lens is the logits: both pick the same token


# --- the bugs, each a plausible one-line mistake in a port ---------------------------------------------------

def rope_interleaved(x, cos, sin):
    """Llama-Meta style RoPE: rotates pairs (x_2i, x_2i+1) instead of (x_i, x_i+Dh/2)."""
    half = x.shape[-1] // 2
    c, s = cos[:, :half], sin[:, :half]  # the angles are repeated in the two halves of cos/sin
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def rms_norm_without_plus_one(x, weight, eps):
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def gelu_exact(x):
    """erf GELU, where Gemma uses the tanh approximation."""
    return (0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))).astype(np.float32)


def embed_unscaled(token_ids, table, scale, rows=layers.embedding_rows):
    return layers.embed(token_ids, table, 1.0, rows)  # forgets * sqrt(D)


def attention_probs_cap_after_mask(q, k, mask, scale, cap):
    """Masks first, then soft-caps: the -inf of a masked score becomes -cap, and future tokens get weight."""
    H, T, Dh = q.shape
    K = k.shape[0]
    scores = (q.reshape(K, -1, Dh) @ k.transpose(0, 2, 1)).reshape(H, T, -1) * np.float32(scale)
    scores = layers.softcap(np.where(mask, scores, np.float32(-np.inf)), cap)
    return layers.softmax(scores)


# bug -> (model, function to replace as "module.name", the buggy version, where compare must see it start)
BUGS = {
    "interleaved RoPE pairs": ("gemma3", "backend.apply_rope", rope_interleaved, (0, "q")),
    "norm without +1": ("gemma1", "backend.rms_norm", rms_norm_without_plus_one, (0, "attn_norm")),
    "exact GELU": ("gemma2", "layers.gelu_tanh", gelu_exact, (0, "mlp_out")),
    "missing embedding scale": ("gemma3", "model.embed", embed_unscaled, (None, "embed")),
    "soft-cap after the mask": ("gemma2", "layers.attention_probs", attention_probs_cap_after_mask, (0, "probs")),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_compare_names_where_an_injected_bug_starts(pair, bug, monkeypatch):
    name, target, buggy, (layer, step) = BUGS[bug]
    ours, hf, ids = pair(name)
    module, function = target.split(".")
    if module == "backend":  # a bug in one of the backend's operations: a backend value that has it
        ours = Gemma(ours.config, ours.params, backend=dataclasses.replace(kernels.NUMPY, **{function: buggy}))
    else:  # the reference backend (the model's, from load()) calls these through their modules
        monkeypatch.setattr(getattr(minigemma, module), function, buggy)
    assert ours.backend.name == "numpy"  # a compiled attention kernel would not see a bug in attention_probs
    report = compare(ours, hf, ids)
    first = report.first_departure
    assert first is not None and (first.layer, first.step) == (layer, step), report.format()
    # not a near miss: the departure stands out from the noise of every step before it
    assert first.rel_diff > 3 * report.threshold  # threshold 3e-5; measured 1.3e-4 (exact GELU), the others >= 0.6
    before = report.differences[:report.differences.index(first)]
    assert all(d.rel_diff < report.threshold / 10 for d in before)  # measured <= 3.3e-7
    assert report.departs(report.difference(None, "logits"))  # the model's output changed, not just a recording
    text = report.format()
    assert f"first departure from float32 noise: {first.where()}" in text


# Mistakes in reading the config or the weights rather than in the code: the same model with one thing changed.
def _with_config(**changes):
    return lambda m: Gemma(dataclasses.replace(m.config, **changes), m.params)


def _one_rope_base(m):  # Gemma 3 sliding layers use base 1e4, global ones 1e6: a port that uses one for both
    c = m.config
    return Gemma(dataclasses.replace(c, rope={**c.rope, SLIDING: c.rope[FULL]}), m.params)


def _without_qk_norm(m):
    return Gemma(_overriding(m.config, qk_norm=False), m.params)


def _norm_plus_one_twice(m):  # llama.cpp's GGUF converter stores 1 + w: adding 1 again when loading a GGUF
    norms = ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")
    layers_ = [dataclasses.replace(p, **{n: getattr(p, n) + 1 for n in norms if getattr(p, n, None) is not None})
               for p in m.params.layers]
    return Gemma(m.config, dataclasses.replace(m.params, layers=layers_, final_norm=m.params.final_norm + 1))


# mistake -> (model, how to make it, where compare must see it start)
MISTAKES = {
    "query scale from head_dim": ("gemma2", _with_config(query_pre_attn_scalar=TINY["head_dim"]), (0, "probs")),
    "no attention soft-cap": ("gemma2", _with_config(attn_logit_softcapping=None), (0, "probs")),
    "no final soft-cap": ("gemma2", _with_config(final_logit_softcapping=None), (None, "logits")),
    "no sliding window": ("gemma2", _with_config(sliding_window=None), (0, "probs")),
    "one RoPE base for both layer types": ("gemma3", _one_rope_base, (0, "q")),
    "no QK-norm": ("gemma3", _without_qk_norm, (0, "q")),
    "GGUF norm +1 applied twice": ("gemma3", _norm_plus_one_twice, (0, "attn_norm")),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_compare_names_where_a_config_or_weight_mistake_starts(pair, mistake):
    name, make, (layer, step) = MISTAKES[mistake]
    ours, hf, ids = pair(name)
    report = compare(make(ours), hf, ids)
    first = report.first_departure
    assert first is not None and (first.layer, first.step) == (layer, step), report.format()
    assert first.rel_diff > 3 * report.threshold  # threshold 3e-5; measured >= 0.1


@pytest.mark.slow
def test_residual_stream_of_the_builtin_model_overflows_float16(real_model):
    """Why Gemma 2/3 break in float16 (vllm-project/vllm#6177, huggingface/transformers#36822): the residual
    stream grows past float16's largest value, 65504, even on a one-word prompt. minigemma computes in float32."""
    with record_forward() as rec:
        real_model.forward(real_model.tokenizer.encode("Hello"))
    stream = rec.residual_stream()  # (L + 1, T, D)
    assert np.abs(stream).max() > np.finfo(np.float16).max  # measured ~1.0e5
    with np.errstate(over="ignore"):
        assert np.isinf(stream.astype(np.float16)).any()


@pytest.mark.slow
def test_cli_on_the_builtin_model_is_within_noise(capsys, monkeypatch, hf_builtin):
    """`python -m minigemma compare`, run in-process. transformers' copy of the GGUF (20-40 s to load) is the
    session's (conftest.hf_builtin, made by the command's own load_transformers_model), not loaded again."""
    from minigemma import compare
    from minigemma.cli import main

    monkeypatch.setattr(compare, "load_transformers_model", lambda model: hf_builtin)

    code = main(["compare"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "every step is within float32 noise" in out
    assert out.count("!") == 1  # in the legend only: no step is flagged
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == 18  # 18 layers


def test_cli_without_transformers_says_so(monkeypatch, capsys, tmp_path):
    import sys

    from minigemma.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    assert main(["compare", "--model", str(tmp_path)]) == 1  # said before looking at the model
    err = capsys.readouterr().err.strip()
    assert err.startswith("minigemma: error:") and "transformers" in err and "\n" not in err


def test_gemma1_gguf_is_refused_with_the_reason(tmp_path):
    from gguf_convert import convert
    from minigemma.compare import load_transformers_model

    path = convert(make_hf_model("gemma", num_key_value_heads=1, vocab_size=300), tmp_path / "gemma1.gguf")
    with pytest.raises(ValueError, match="transformers cannot load Gemma 1 GGUF"):
        load_transformers_model(minigemma.load(path, progress=False))
