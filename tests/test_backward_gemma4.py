"""The backward functions of Gemma 4's new parts (layers.py, section "Gemma 4"), against torch autograd in float64
and against float64 finite differences.

Oracles: transformers' own Gemma4TextExperts (it runs in float64 as it is); for the router, the per-layer branch
and the per-layer inputs a direct torch transcription of transformers' code (Gemma4TextRouter,
Gemma4TextDecoderLayer, Gemma4TextModel.project_per_layer_inputs), because their Gemma4RMSNorm and the router's
softmax cast to float32 (`hidden_states.float()`, `softmax(..., dtype=torch.float32)`), which would hide a
wrong term below float32 rounding. The norms are written with transformers' gain w = 1 + ours (ours are
zero-centred, params.py), so the gradient of a gain is the same number on both sides.

Finite differences: for each input and parameter, along a random direction d, (L(p + h d) - L(p - h d)) / 2h
against <grad, d>, with L = sum(dout * f) in float64 and h = 1e-6 (relative 1e-6). The router's top-k choice is
piecewise constant: the points drawn are far from a tie (checked), so the step h never changes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from minigemma import layers
from test_backward import assert_close, draw, grads_of, leaf

FEW = settings(max_examples=8, deadline=None)
seeds = st.integers(0, 2**32 - 1)
EPS = 1e-6
gelu = ACT2FN["gelu_pytorch_tanh"]


def torch_rms_norm(x, w=None):
    """Gemma4RMSNorm in float64: x * (mean(x^2) + eps)^-1/2 * w (transformers' w is ours + 1)."""
    y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + EPS, -0.5)
    return y if w is None else y * w


def finite_difference(f, arrays: dict, grads: dict, seed=0):
    """Check each grads[name] = dL/d arrays[name] for L = f() (which reads arrays in place) along one random
    direction each."""
    rng = np.random.default_rng(seed)
    h = 1e-6
    for name, a in arrays.items():
        d = rng.standard_normal(a.shape)
        a += h * d
        up = f()
        a -= 2 * h * d
        down = f()
        a += h * d
        numeric, analytic = (up - down) / (2 * h), float(np.sum(grads[name] * d))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8), name


# ---- per-layer inputs ------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, T=st.integers(1, 5), L=st.integers(1, 3), P=st.sampled_from([2, 3, 6]), D=st.sampled_from([4, 10]))
def test_per_layer_inputs_backward(seed, T, L, P, D):
    rng = np.random.default_rng(seed)
    rows, x, W, norm = draw(rng, T, L * P), draw(rng, T, D), draw(rng, L * P, D, scale=0.5), draw(rng, P, scale=0.5)
    dout = draw(rng, T, L, P)
    t_rows, tx, tW, tn = leaf(rows), leaf(x), leaf(W), leaf(norm)
    a = (tx @ tW.T) * D**-0.5  # transformers project_per_layer_inputs
    y = (torch_rms_norm(a.reshape(T, L, P), 1 + tn) + t_rows.reshape(T, L, P)) * 2.0**-0.5
    refs = grads_of(y, dout, t_rows, tx, tW, tn)

    assert_close(layers.per_layer_inputs(rows, x, W, norm, EPS, L), y.detach().numpy())
    dW, dnorm = np.zeros_like(W), np.zeros_like(norm)
    drows, dx = layers.per_layer_inputs_backward(dout, rows, x, W, norm, EPS, L, dW, dnorm)
    for ours, ref in zip((drows, dx, dW, dnorm), refs):
        assert_close(ours, ref)

    loss = lambda: float(np.sum(dout * layers.per_layer_inputs(rows, x, W, norm, EPS, L)))  # noqa: E731
    finite_difference(loss, {"rows": rows, "x": x, "W": W, "norm": norm},
                      {"rows": drows, "x": dx, "W": dW, "norm": dnorm})


# ---- the per-layer branch -------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, T=st.integers(1, 5), P=st.sampled_from([2, 3, 6]), D=st.sampled_from([4, 10]))
def test_per_layer_branch_backward(seed, T, P, D):
    rng = np.random.default_rng(seed)
    x, u, gate, proj = draw(rng, T, D), draw(rng, T, P), draw(rng, P, D, scale=0.5), draw(rng, D, P, scale=0.5)
    norm, dout = draw(rng, D, scale=0.5), draw(rng, T, D)
    tx, tu, tg, tp, tn = leaf(x), leaf(u), leaf(gate), leaf(proj), leaf(norm)
    y = torch_rms_norm((gelu(tx @ tg.T) * tu) @ tp.T, 1 + tn)  # Gemma4TextDecoderLayer's third branch
    refs = grads_of(y, dout, tx, tu, tg, tp, tn)

    assert_close(layers.per_layer_branch(x, u, gate, proj, norm, EPS), y.detach().numpy())
    dgate, dproj, dnorm = np.zeros_like(gate), np.zeros_like(proj), np.zeros_like(norm)
    dx, du = layers.per_layer_branch_backward(dout, x, u, gate, proj, norm, EPS, dgate, dproj, dnorm)
    for ours, ref in zip((dx, du, dgate, dproj, dnorm), refs):
        assert_close(ours, ref)

    loss = lambda: float(np.sum(dout * layers.per_layer_branch(x, u, gate, proj, norm, EPS)))  # noqa: E731
    finite_difference(loss, {"x": x, "u": u, "gate": gate, "proj": proj, "norm": norm},
                      {"x": dx, "u": du, "gate": dgate, "proj": dproj, "norm": dnorm})


# ---- the router -----------------------------------------------------------------------------------------------

def far_from_ties(x, scale, proj, top_k):
    """The gap between the k-th and (k+1)-th router probability of every token: a finite-difference step must
    not change the choice."""
    D = x.shape[-1]
    probs = layers.softmax(layers.linear(layers.rms_norm(x, np.zeros(D), EPS) * scale * D**-0.5, proj))
    top = -np.sort(-probs, axis=-1)
    return top_k == probs.shape[-1] or np.min(top[:, top_k - 1] - top[:, top_k]) > 1e-4


@FEW
@given(seed=seeds, T=st.integers(1, 6), E=st.sampled_from([2, 4, 5]), k=st.integers(1, 3), D=st.sampled_from([4, 10]))
def test_route_backward(seed, T, E, k, D):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    x, scale, proj = draw(rng, T, D), 1 + draw(rng, D, scale=0.5), draw(rng, E, D, scale=2.0)
    expert_scale, dout = 1 + draw(rng, E, scale=0.5), draw(rng, T, k)
    if not far_from_ties(x, scale, proj, k):
        return  # a near-tie: the top-k choice could flip within a step (rare at this scale)
    weights, chosen = layers.route(x, scale, proj, expert_scale, k, EPS)
    tx, ts, tp, te = leaf(x), leaf(scale), leaf(proj), leaf(expert_scale)
    # Gemma4TextRouter, in float64, given our choice of experts (torch.topk's order among equals may differ)
    probs = torch.softmax((torch_rms_norm(tx) * ts * D**-0.5) @ tp.T, dim=-1)
    top = torch.gather(probs, -1, torch.as_tensor(chosen))
    y = top / top.sum(-1, keepdim=True) * te[torch.as_tensor(chosen)]
    refs = grads_of(y, dout, tx, ts, tp, te)
    assert set(map(tuple, np.sort(chosen, -1))) <= set(map(tuple, np.sort(
        torch.topk(probs.detach(), k).indices.numpy(), -1)))  # the same experts as torch.topk

    assert_close(weights, y.detach().numpy())
    dscale, dproj, dexpert = np.zeros_like(scale), np.zeros_like(proj), np.zeros_like(expert_scale)
    dx = layers.route_backward(dout, x, scale, proj, expert_scale, chosen, EPS, dscale, dproj, dexpert)
    for ours, ref in zip((dx, dscale, dproj, dexpert), refs):
        assert_close(ours, ref)

    def loss():
        w, c = layers.route(x, scale, proj, expert_scale, k, EPS)
        assert np.array_equal(c, chosen)  # the step did not change the choice
        return float(np.sum(dout * w))

    finite_difference(loss, {"x": x, "scale": scale, "proj": proj, "expert_scale": expert_scale},
                      {"x": dx, "scale": dscale, "proj": dproj, "expert_scale": dexpert})


# ---- the experts ----------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, T=st.integers(1, 7), E=st.sampled_from([2, 4]), k=st.integers(1, 2), I=st.sampled_from([2, 5]))
def test_experts_backward(seed, T, E, k, I):  # noqa: E741
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    D = 6
    rng = np.random.default_rng(seed)
    x, dout = draw(rng, T, D), draw(rng, T, D)
    chosen = np.stack([rng.permutation(E)[:k] for _ in range(T)])  # (T, k): each token's k distinct experts
    weights = draw(rng, T, k)
    gate_up, down = draw(rng, E, 2 * I, D, scale=0.5), draw(rng, E, D, I, scale=0.5)
    module = Gemma4TextExperts(Gemma4TextConfig(hidden_size=D, num_experts=E, moe_intermediate_size=I)).double()
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.as_tensor(gate_up))
        module.down_proj.copy_(torch.as_tensor(down))
    tx, tw = leaf(x), leaf(weights)
    y = module(tx, torch.as_tensor(chosen), tw)
    dx_ref, dw_ref, dgu_ref, dd_ref = grads_of(y, dout, tx, tw, module.gate_up_proj, module.down_proj)

    gu, dn = list(gate_up), list(down)  # minigemma holds one matrix per expert
    assert_close(layers.experts(x, weights, chosen, gu, dn), y.detach().numpy())
    dgu, ddn = [np.zeros_like(m) for m in gu], [np.zeros_like(m) for m in dn]
    dx, dw = layers.experts_backward(dout, x, weights, chosen, gu, dn, dgu, ddn)
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)
    assert_close(np.stack(dgu), dgu_ref)  # an expert no token chose gets zeros on both sides
    assert_close(np.stack(ddn), dd_ref)

    loss = lambda: float(np.sum(dout * layers.experts(x, weights, chosen, gu, dn)))  # noqa: E731
    arrays = {"x": x, "weights": weights, **{f"gate_up{e}": gu[e] for e in range(E)},
              **{f"down{e}": dn[e] for e in range(E)}}
    grads = {"x": dx, "weights": dw, **{f"gate_up{e}": dgu[e] for e in range(E)},
             **{f"down{e}": ddn[e] for e in range(E)}}
    finite_difference(loss, arrays, grads)


# ---- the value norm and proportional RoPE: existing backward functions on Gemma 4's inputs ---------------------

def test_value_norm_is_rms_norm_backward_with_no_gain():
    """The value norm (Gemma4RMSNorm with_scale=False) is rms_norm with the zero-centred gain 0: its gradient is
    rms_norm_backward's with that gain, and no weight gradient to keep."""
    rng = np.random.default_rng(0)
    v, dout = draw(rng, 2, 5, 6), draw(rng, 2, 5, 6)
    tv = leaf(v)
    dv_ref, = grads_of(torch_rms_norm(tv), dout, tv)
    assert_close(layers.rms_norm_backward(dout, v, np.zeros(6), EPS), dv_ref)


def test_rope_backward_on_a_proportional_table():
    """apply_rope_backward with proportional_rope_angles' table is the gradient of the rotation (torch), and the
    pairs that do not rotate pass their gradient through unchanged."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    Dh, pairs = 16, 2  # a quarter of the 8 pairs rotate
    cos, sin = layers.proportional_rope_angles(np.arange(3, 10), Dh, 10_000.0, 1.0, 0.25)
    x, dout = draw(rng, 3, 7, Dh), draw(rng, 3, 7, Dh)
    tx = leaf(x)
    # transformers takes (batch, T, heads, Dh) with unsqueeze_dim=2
    y = apply_rotary_pos_emb(tx.transpose(0, 1)[None], torch.as_tensor(cos, dtype=torch.float64)[None],
                             torch.as_tensor(sin, dtype=torch.float64)[None], unsqueeze_dim=2)[0].transpose(0, 1)
    dx_ref, = grads_of(y, dout, tx)
    dx = layers.apply_rope_backward(dout, cos, sin)
    assert_close(dx, dx_ref)
    still = np.r_[pairs:Dh // 2, Dh // 2 + pairs:Dh]  # the pairs with frequency 0
    np.testing.assert_array_equal(dx[..., still], dout[..., still])
    assert np.abs(dx[..., :pairs] - dout[..., :pairs]).max() > 1e-2  # the rotated ones do turn


def test_route_backward_matches_transformers_router_in_float32():
    """The transcription above against transformers' own Gemma4TextRouter, where it runs (float32): the same
    gradients of the routing weights, to float32 rounding, for x and all three router parameters."""
    import transformers
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    from conftest import randomize_

    hf = transformers.Gemma4TextConfig(hidden_size=32, num_experts=6, top_k_experts=2)
    router = randomize_(Gemma4TextRouter(hf), seed=3)
    rng = np.random.default_rng(7)
    x, dout = draw(rng, 9, 32).astype(np.float32), draw(rng, 9, 2).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    _, weights, index = router(tx)
    refs = grads_of(weights, dout, tx, router.scale, router.proj.weight, router.per_expert_scale)

    scale, proj = router.scale.detach().numpy(), router.proj.weight.detach().numpy()
    expert_scale = router.per_expert_scale.detach().numpy()
    ours_w, chosen = layers.route(x, scale, proj, expert_scale, 2, hf.rms_norm_eps)
    assert np.array_equal(chosen, index.numpy())  # the same experts in the same order (no ties here)
    grads = np.zeros_like(scale), np.zeros_like(proj), np.zeros_like(expert_scale)
    dx = layers.route_backward(dout, x, scale, proj, expert_scale, chosen, hf.rms_norm_eps, *grads)
    for ours, ref in zip((dx, *grads), refs):
        assert_close(ours, ref, rtol=1e-5)
