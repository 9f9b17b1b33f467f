"""Each minigemma layer against the matching transformers module, on random inputs.

transformers 5.24 (float32, CPU, eager attention) is the oracle: its RMSNorm, rotary embedding and
`apply_rotary_pos_emb`, activation table, MLP, attention and decoder-layer modules, fed the same random
weights and inputs as minigemma's functions. Where no module exists (the boolean mask) the oracle is
transformers' mask functions evaluated on index grids, and the definition written out in Python.

Tolerances. Both sides compute in float32 (eps = 2^-23 ~ 1.2e-7), but not in the same order (different matmul
kernels, torch vs NumPy pow/cos/tanh), so results agree to a few float32 rounding steps per reduction. With the
sizes used here (sums over <= 256 terms) that stays below 1e-5 of the output's largest magnitude, which is the
default tolerance below (`assert_close`). A real mistake (wrong pairing, scale, norm offset, activation, mask,
soft-cap order, head grouping) moves outputs by 1e-2 or more. RoPE at large positions needs a position-dependent
bound, derived at `rope_atol`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.activations import ACT2FN
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay
from transformers.models.gemma import modeling_gemma as hf_gemma
from transformers.models.gemma2 import modeling_gemma2 as hf_gemma2
from transformers.models.gemma3 import modeling_gemma3 as hf_gemma3

from conftest import randomize_  # matrices N(0, 0.2^2), norm gains N(0, 0.5^2): (1 + w) far from 1
from minigemma import layers
from minigemma.config import FULL, SLIDING, GemmaConfig

EPS32 = 2.0**-23  # float32 machine epsilon
RTOL = 1e-5  # see the module docstring


def assert_close(ours, ref, rtol=RTOL):
    """Elementwise |ours - ref| <= rtol * (|ref| + max|ref|): relative to the magnitude of the whole output,
    so values that cancel to near zero are not held to a relative bound they cannot meet."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.max(np.abs(ref))))


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def np_(p) -> np.ndarray:
    return p.detach().numpy().astype(np.float32)


# ---- Embedding ------------------------------------------------------------------------------------------

EMBED_MODELS = [(transformers.GemmaConfig, hf_gemma.GemmaModel), (transformers.Gemma2Config, hf_gemma2.Gemma2Model),
                (transformers.Gemma3TextConfig, hf_gemma3.Gemma3TextModel)]


@pytest.mark.parametrize("config_cls,model_cls", EMBED_MODELS)
@pytest.mark.parametrize("D", [48, 3072])  # sqrt(D) irrational: its float32 rounding must agree (3072: gemma-7b)
def test_embed_matches_transformers(config_cls, model_cls, D):
    """The model's own embedding module (a `*TextScaledWordEmbedding` built with the scale transformers
    chooses) against `layers.embed` with the scale our config derives: a gather and one float32 multiply on
    both sides, so equal bit for bit."""
    hf_config = config_cls(vocab_size=50, hidden_size=D, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    module = model_cls(hf_config).embed_tokens
    assert type(module).__name__.endswith("TextScaledWordEmbedding")
    randomize_(module, seed=14)
    ids = np.concatenate([[0, 49], np.random.default_rng(14).integers(0, 50, 30)])
    with torch.no_grad():
        ref = module(torch.as_tensor(ids)).numpy()
    table = np_(module.weight)
    ours = layers.embed(ids, table, GemmaConfig.from_hf_dict(hf_config.to_dict()).embed_scale)
    assert ours.dtype == np.float32 and ours.shape == (len(ids), D)
    np.testing.assert_array_equal(ours, ref)
    assert np.max(np.abs(ours - table[ids])) > 1  # the scale is applied (sqrt(D) >= 6.9)


# ---- RMSNorm ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_cls", [hf_gemma.GemmaRMSNorm, hf_gemma3.Gemma3RMSNorm])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])  # 1e-4: mean(x^2) ~ 1e-8 << eps, so eps dominates
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_transformers(norm_cls, scale, eps):
    rng = np.random.default_rng(0)
    D = 64
    x = (rng.standard_normal((3, 5, D)) * scale).astype(np.float32)
    w = (rng.standard_normal(D) * 0.5).astype(np.float32)
    norm = norm_cls(D, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(t(w))
        ref = norm(t(x)).numpy()
    ours = layers.rms_norm(x, w, eps)
    assert ours.dtype == np.float32
    assert_close(ours, ref)


def test_rms_norm_gain_is_one_plus_weight():
    """A zero weight is the identity gain (Gemma stores the gain zero-centred); the output then has RMS 1."""
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32) * 7
    y = layers.rms_norm(x, np.zeros(32, np.float32), 0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(y.astype(np.float64) ** 2, -1)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e3])  # 1e3: x^2 = 1e6 overflows float16 (max 65504)
def test_rms_norm_computes_in_float32_from_float16(scale):
    rng = np.random.default_rng(2)
    D = 64
    x16 = (rng.standard_normal((6, D)) * scale).astype(np.float16)
    w = (rng.standard_normal(D) * 0.5).astype(np.float32)
    ours = layers.rms_norm(x16, w, 1e-6)
    assert ours.dtype == np.float32
    # the same as normalising the float16 values converted to float32 (exactly: float16 -> float32 is exact)
    np.testing.assert_array_equal(ours, layers.rms_norm(x16.astype(np.float32), w, 1e-6))
    assert np.all(np.isfinite(ours))
    # transformers computes in float32 and casts back to float16 only at the end ("(x * w).to(float16)");
    # our float32 result rounded to float16 is that, up to one float16 rounding step (2^-10 relative)
    norm = hf_gemma.GemmaRMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(t(w))
        ref16 = norm(t(x16)).numpy()
    assert ref16.dtype == np.float16
    np.testing.assert_allclose(ours.astype(np.float16).astype(np.float32), ref16.astype(np.float32),
                               rtol=2.0**-10, atol=2.0**-10 * float(np.max(np.abs(ref16))))


# ---- RoPE ------------------------------------------------------------------------------------------------

POSITIONS = np.array([0, 1, 2, 3, 7, 100, 511, 512, 513, 1000, 2047, 4095, 4096, 4999, 5000])
HEAD_DIM = 256  # every Gemma's head_dim


def rope_atol(positions) -> np.ndarray:
    """How far two correct float32 RoPE tables may differ at each position (shape (T, 1)).

    inv_freq_i <= 1, and torch's and NumPy's float32 pow may round it 1 ulp apart (<= 2^-24 below 1); the
    angle p * inv_freq then differs by <= p * 2^-24, plus each side's rounding of the product (<= half an ulp
    of the angle, 2^-24 * p each). cos and sin have slope <= 1, so the tables differ by <= p * 2^-22, plus a
    few ulps for cos/sin themselves. At p = 5000 that is 1.2e-3; a wrong theta, factor or position moves
    angles by O(1) radians."""
    return (np.asarray(positions, np.float64) * 2.0**-22 + 4 * EPS32)[:, None]


def hf_rope_tables(theta: float, factor: float, positions, layer_type: str | None):
    """cos, sin from transformers: Gemma3RotaryEmbedding for a layer type, GemmaRotaryEmbedding otherwise."""
    rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor} if factor != 1.0 else \
        {"rope_type": "default", "rope_theta": theta}
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=HEAD_DIM,
                  intermediate_size=96, num_hidden_layers=2, vocab_size=32)
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.as_tensor(np.asarray(positions))[None]
    if layer_type is None:
        rot = hf_gemma.GemmaRotaryEmbedding(transformers.GemmaConfig(**common, rope_parameters=rope))
        cos, sin = rot(x, pos)
    else:
        other = {"rope_type": "default", "rope_theta": 12345.0}  # the other layer type: must not leak in
        params = {layer_type: rope, (FULL if layer_type == SLIDING else SLIDING): other}
        cfg = transformers.Gemma3TextConfig(**common, rope_parameters=params,
                                            layer_types=[SLIDING, FULL])
        cos, sin = hf_gemma3.Gemma3RotaryEmbedding(cfg)(x, pos, layer_type)
    return cos[0].numpy(), sin[0].numpy()


ROPE_CASES = [  # (theta, factor, layer type)
    (10_000.0, 1.0, None),  # Gemma 1/2
    (1_000_000.0, 1.0, None),
    (10_000.0, 1.0, SLIDING),  # Gemma 3 local layers
    (1_000_000.0, 1.0, FULL),  # Gemma 3 global layers (270m, 1b)
    (1_000_000.0, 8.0, FULL),  # Gemma 3 4b+ global layers: linear scaling
    (10_000.0, 4.0, None),  # linear scaling through the single-table class
]


@pytest.mark.parametrize("theta,factor,layer_type", ROPE_CASES)
def test_rope_angles_match_transformers(theta, factor, layer_type):
    cos_ref, sin_ref = hf_rope_tables(theta, factor, POSITIONS, layer_type)
    cos, sin = layers.rope_angles(POSITIONS, HEAD_DIM, theta, factor)
    assert cos.shape == sin.shape == (len(POSITIONS), HEAD_DIM)
    assert cos.dtype == sin.dtype == np.float32
    atol = rope_atol(POSITIONS)
    assert np.all(np.abs(cos - cos_ref) <= atol) and np.all(np.abs(sin - sin_ref) <= atol)


@pytest.mark.parametrize("theta,factor,layer_type", ROPE_CASES)
def test_apply_rope_matches_transformers(theta, factor, layer_type):
    rng = np.random.default_rng(3)
    H, K, T = 4, 2, len(POSITIONS)
    q = rng.standard_normal((H, T, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((K, T, HEAD_DIM)).astype(np.float32)
    cos_ref, sin_ref = hf_rope_tables(theta, factor, POSITIONS, layer_type)
    q_ref, k_ref = hf_gemma.apply_rotary_pos_emb(t(q)[None], t(k)[None], t(cos_ref)[None], t(sin_ref)[None])
    q_ref, k_ref = q_ref[0].numpy(), k_ref[0].numpy()

    # 1) the rotation alone, on transformers' own tables: the same float32 operations
    assert_close(layers.apply_rope(q, cos_ref, sin_ref), q_ref, rtol=1e-6)
    assert_close(layers.apply_rope(k, cos_ref, sin_ref), k_ref, rtol=1e-6)

    # 2) end to end with our tables: each output is a sum of two table entries times an input element,
    # so it may be off by 2 * max|x| * rope_atol(p) (see rope_atol)
    cos, sin = layers.rope_angles(POSITIONS, HEAD_DIM, theta, factor)
    for ours, ref, x in ((layers.apply_rope(q, cos, sin), q_ref, q), (layers.apply_rope(k, cos, sin), k_ref, k)):
        bound = 2 * np.max(np.abs(x)) * rope_atol(POSITIONS)  # (T, 1), broadcast over heads and Dh
        assert np.all(np.abs(ours - ref) <= bound)


@pytest.mark.parametrize("i", [0, 1, 5, 64, 127])
@pytest.mark.parametrize("p", [1, 3, 100, 4999])
def test_rope_pairs_element_i_with_i_plus_half(i, p):
    """Split-half pairing: a vector with only x_i and x_{i+Dh/2} non-zero stays in that plane, rotated by
    angle p * theta^(-2i/Dh). An interleaved (2i, 2i+1) RoPE would leak into element i+1 or i-1."""
    Dh, theta = HEAD_DIM, 10_000.0
    a, b = 0.6, -1.3
    x = np.zeros((1, 1, Dh), np.float32)
    x[0, 0, i], x[0, 0, i + Dh // 2] = a, b
    cos, sin = layers.rope_angles(np.array([p]), Dh, theta)
    y = layers.apply_rope(x, cos, sin)[0, 0]

    others = np.delete(y, [i, i + Dh // 2])
    assert np.all(others == 0)
    angle = p * theta ** (-2 * i / Dh)  # float64
    tol = 2 * abs(b) * float(rope_atol([p])[0, 0]) + 2 * EPS32
    assert abs(y[i] - (a * np.cos(angle) - b * np.sin(angle))) <= tol
    assert abs(y[i + Dh // 2] - (b * np.cos(angle) + a * np.sin(angle))) <= tol
    assert np.hypot(y[i], y[i + Dh // 2]) == pytest.approx(np.hypot(a, b), rel=1e-6)  # a rotation


# ---- GELU and MLP ----------------------------------------------------------------------------------------

def test_gelu_tanh_matches_transformers_and_not_erf_gelu():
    rng = np.random.default_rng(4)
    x = np.concatenate([np.linspace(-10, 10, 2001), rng.standard_normal(1000) * 3]).astype(np.float32)
    ours = layers.gelu_tanh(x)
    ref = ACT2FN["gelu_pytorch_tanh"](t(x)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-6)  # values of O(1): 1e-6 is ~10 float32 ulps
    # exact (erf) GELU differs from the tanh approximation by up to ~5e-4: far above the tolerance, so using
    # it (transformers#29402) would fail the assertion above
    erf_gelu = torch.nn.functional.gelu(t(x), approximate="none").numpy()
    assert np.max(np.abs(ours - erf_gelu)) > 100 * 1e-6


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])  # "gelu" is rewritten to tanh (Gemma 1)
def test_mlp_matches_transformers(hidden_act):
    D, F, T = 64, 96, 7
    mlp = randomize_(hf_gemma.GemmaMLP(transformers.GemmaConfig(hidden_size=D, intermediate_size=F,
                                                                hidden_act=hidden_act)), seed=5)
    x = np.random.default_rng(5).standard_normal((T, D)).astype(np.float32)
    with torch.no_grad():
        ref = mlp(t(x)).numpy()
    ours = layers.mlp(x, np_(mlp.gate_proj.weight), np_(mlp.up_proj.weight), np_(mlp.down_proj.weight))
    assert ours.dtype == np.float32
    assert_close(ours, ref)


# ---- Masks -----------------------------------------------------------------------------------------------

MASK_CASES = {  # name -> (query positions, key positions)
    "prefill": (np.arange(0, 12), np.arange(0, 12)),
    # a cached continuation: 4 new tokens after 10, keys are the whole history
    "continuation": (np.arange(10, 14), np.arange(0, 14)),
    # a sliding layer's cache after trimming: keys start past 0
    "trimmed-cache": (np.arange(20, 23), np.arange(13, 23)),
    "one-decode-step": (np.array([30]), np.arange(0, 31)),
}


@pytest.mark.parametrize("window", [1, 3, 8, None])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_attention_mask(case, window):
    q_pos, k_pos = MASK_CASES[case]
    ours = layers.attention_mask(q_pos, k_pos, window)
    assert ours.dtype == bool and ours.shape == (len(q_pos), len(k_pos))

    # transformers' mask functions on the grid of absolute positions
    fn = causal_mask_function if window is None else and_masks(causal_mask_function,
                                                                sliding_window_overlay(window))
    qi, ki = torch.as_tensor(q_pos)[:, None], torch.as_tensor(k_pos)[None, :]
    ref = fn(torch.tensor(0), torch.tensor(0), qi, ki).expand(len(q_pos), len(k_pos)).numpy()
    np.testing.assert_array_equal(ours, ref)

    # the definition: a query at i sees the last W positions, itself included
    for r, i in enumerate(q_pos):
        visible = {j for j in range(i + 1) if window is None or j >= i - window + 1}
        assert set(k_pos[ours[r]]) == visible & set(k_pos)
    if window == 1:  # each query sees only itself
        assert np.array_equal(ours, q_pos[:, None] == k_pos[None, :])


# ---- Soft-cap and the final stage (final norm, tied head, final soft-cap) -------------------------------

@pytest.mark.parametrize("cap", [0.5, 30.0, 50.0])  # 30: Gemma 2's final cap, 50: its attention cap
def test_softcap_is_cap_times_tanh_of_x_over_cap(cap):
    rng = np.random.default_rng(15)
    x = np.concatenate([np.linspace(-20 * cap, 20 * cap, 4001), rng.standard_normal(1000) * cap,
                        [0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf]]).astype(np.float32)
    ours = layers.softcap(x, cap)
    assert ours.dtype == np.float32
    exact = cap * np.tanh(x.astype(np.float64) / cap)
    # x / cap, tanh and * cap each round once in float32 (tanh to within a couple of ulps)
    np.testing.assert_allclose(ours, exact, rtol=8 * EPS32, atol=8 * EPS32 * cap)
    assert np.all(np.abs(ours) <= cap)  # squashed into [-cap, cap], however large x (no inf or nan)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(ours[order]) >= 0)  # monotonic
    small = np.abs(x) < cap * 1e-3
    np.testing.assert_allclose(ours[small], x[small], rtol=1e-6)  # the identity near 0
    assert np.array_equal(layers.softcap(x, None), x)  # None: no cap


TINY = dict(vocab_size=32, hidden_size=64, intermediate_size=96, max_position_embeddings=512)


def tiny_gemma2_lm(final_cap: float, seed: int):
    hf_config = transformers.Gemma2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          num_hidden_layers=1, final_logit_softcapping=final_cap,
                                          attn_implementation="eager")
    return hf_config, randomize_(transformers.Gemma2ForCausalLM(hf_config), seed=seed)


def run_replacing(lm, module, inputs=None, outputs=None, T: int = 1) -> np.ndarray:
    """Logits of transformers' own forward pass with the input (or output) of one submodule replaced by ours,
    so everything after that point is transformers' code."""
    if inputs is not None:
        handle = module.register_forward_pre_hook(lambda m, args: (t(inputs)[None],))
    else:
        handle = module.register_forward_hook(lambda m, args, out: t(outputs)[None])
    try:
        with torch.no_grad():
            return lm(torch.zeros((1, T), dtype=torch.long)).logits[0].numpy()
    finally:
        handle.remove()


@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap_matches_transformers_final_logit_capping(cap):
    """Logits fed in at the output of transformers' lm_head come out through its final-cap formula."""
    _, lm = tiny_gemma2_lm(cap, seed=16)
    V = lm.config.vocab_size
    x = np.concatenate([np.linspace(-20 * cap, 20 * cap, 63 * V),
                        np.random.default_rng(16).standard_normal(V) * cap]).astype(np.float32).reshape(64, V)
    ref = run_replacing(lm, lm.lm_head, outputs=x, T=64)
    assert_close(layers.softcap(x, cap), ref, rtol=1e-6)


def test_final_stage_matches_gemma2_for_causal_lm():
    """The same last hidden state through transformers' final norm, tied lm_head and final cap (its
    Gemma2ForCausalLM.forward, from `model.norm` on) and through minigemma's rms_norm, linear and softcap."""
    hf_config, lm = tiny_gemma2_lm(final_cap=3.0, seed=17)  # a cap small enough to bite
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied
    c = GemmaConfig.from_hf_dict(hf_config.to_dict())
    T = 9
    h = np.random.default_rng(17).standard_normal((T, c.hidden_size)).astype(np.float32) * 3
    ref = run_replacing(lm, lm.model.norm, inputs=h, T=T)

    normed = layers.rms_norm(h, np_(lm.model.norm.weight), c.rms_norm_eps)
    uncapped = layers.linear(normed, np_(lm.model.embed_tokens.weight))  # (T, D) @ (D, V) -> (T, V)
    ours = layers.softcap(uncapped, c.final_logit_softcapping)
    assert ours.dtype == np.float32 and ours.shape == (T, c.vocab_size)
    assert_close(ours, ref)
    # the cap and the norm gain both change the answer here, so the match above covers them
    assert np.max(np.abs(uncapped - ref)) > 1.0
    no_gain = layers.softcap(layers.linear(layers.rms_norm(h, np.zeros(c.hidden_size, np.float32),
                                                            c.rms_norm_eps), np_(lm.model.embed_tokens.weight)), 3.0)
    assert np.max(np.abs(no_gain - ref)) > 1e-2
