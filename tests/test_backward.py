"""Each backward function of layers.py against torch autograd, in float64, on odd shapes drawn by hypothesis.

The oracle: the same forward written with torch operations (transformers' own functions where they run in
float64: rotate_half / apply_rotary_pos_emb, the GELU of its activation table), differentiated by autograd
with an upstream gradient `dout` drawn at random: torch's x.grad is then d(sum(dout * y))/dx, which is what
each `*_backward(dout, ...)` returns. In float64 both sides agree to ~1e-12 of the largest value; the
tolerance 1e-9 leaves room for sums over a few hundred terms, while any wrong term of a derivative (a missed
1 + w, a sign in the rotation, a dropped soft-cap factor, a kv head's gradients not summed over its query
heads) moves the result by 1e-2 or more.

Odd shapes: odd lengths, H and K in {1, 2, 4} (multi-query, grouped, multi-head), head dims that are not
powers of two, sliding windows from 1 key up, soft-caps small enough to bend the scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

from minigemma import layers, weights
from minigemma.packed import Int4x64, Int8x64

RTOL = 1e-9
FEW = settings(max_examples=12, deadline=None)


def assert_close(ours, ref, rtol=RTOL):
    """|ours - ref| <= rtol * max(max|ref|, 1) everywhere, and the shapes agree. Inputs are drawn of order 1,
    so the terms of every gradient are too; the floor of 1 covers a result that cancels to nearly nothing
    (RMSNorm of one element: its gradient is ~0 up to rounding of order-1 terms)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * max(float(np.max(np.abs(ref))), 1.0))


def leaf(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def grads_of(y, dout, *inputs):
    """Backpropagate `dout` from y: the gradient of sum(dout * y) with respect to each input."""
    y.backward(torch.as_tensor(dout))
    return [t.grad.numpy() for t in inputs]


def draw(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


seeds = st.integers(0, 2**32 - 1)
odd = st.integers(0, 4).map(lambda n: 2 * n + 1)  # 1, 3, 5, 7, 9
heads = st.sampled_from([(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4)])  # (H, K): MQA, GQA, MHA
head_dims = st.sampled_from([2, 6, 10, 14])  # even (RoPE pairs halves), not powers of two


# ---- RMSNorm ---------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, rows=odd, n=st.integers(1, 23))
def test_rms_norm_backward(seed, rows, n):
    rng = np.random.default_rng(seed)
    x, w, dout = draw(rng, 2, rows, n), draw(rng, n, scale=0.5), draw(rng, 2, rows, n)
    eps = 1e-6
    tx, tw = leaf(x), leaf(w)
    y = tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + eps) * (1 + tw)  # transformers GemmaRMSNorm
    dx_ref, dw_ref = grads_of(y, dout, tx, tw)

    assert_close(layers.rms_norm(x, w, eps), y.detach().numpy())  # the forward keeps float64
    dw = np.zeros(n)
    assert_close(layers.rms_norm_backward(dout, x, w, eps, dw), dx_ref)
    assert_close(dw, dw_ref)
    dw_twice = dw.copy()
    layers.rms_norm_backward(dout, x, w, eps, dw_twice)
    assert_close(dw_twice, 2 * dw_ref)  # gradients are added, not written


# ---- RoPE ------------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, n=st.integers(1, 4), T=odd, dh=head_dims, theta=st.sampled_from([10.0, 1e4, 1e6]))
def test_apply_rope_backward(seed, n, T, dh, theta):
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(1000, T, replace=False))
    cos, sin = (a.astype(np.float64) for a in layers.rope_angles(positions, dh, theta))
    x, dout = draw(rng, n, T, dh), draw(rng, n, T, dh)
    tx = leaf(x[None])  # (1, n, T, Dh): transformers' (B, heads, T, Dh)
    y, _ = apply_rotary_pos_emb(tx, tx.detach(), torch.as_tensor(cos)[None], torch.as_tensor(sin)[None])
    (dx_ref,) = grads_of(y, dout[None], tx)
    assert_close(layers.apply_rope_backward(dout, cos, sin), dx_ref[0])


# ---- soft-cap, GELU --------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, n=odd, cap=st.sampled_from([None, 0.5, 3.0, 50.0]))
def test_softcap_backward(seed, n, cap):
    rng = np.random.default_rng(seed)
    x, dout = draw(rng, n, 3, scale=4.0), draw(rng, n, 3)
    tx = leaf(x)
    y = tx if cap is None else cap * torch.tanh(tx / cap)
    (dx_ref,) = grads_of(y * 1.0, dout, tx)
    assert_close(layers.softcap_backward(dout, x, cap), dx_ref)


@FEW
@given(seed=seeds, n=odd)
def test_gelu_tanh_backward(seed, n):
    rng = np.random.default_rng(seed)
    x, dout = draw(rng, n, 5, scale=3.0), draw(rng, n, 5)
    tx = leaf(x)
    y = ACT2FN["gelu_pytorch_tanh"](tx)  # torch's gelu(approximate="tanh")
    (dx_ref,) = grads_of(y, dout, tx)
    assert_close(layers.gelu_tanh(x), y.detach().numpy())
    assert_close(layers.gelu_tanh_backward(dout, x), dx_ref)


# ---- attention -------------------------------------------------------------------------------------------

def torch_attention(q, k, v, mask, scale, cap):
    """Attention written out in torch, in transformers' eager order: repeat kv heads, scale, soft-cap, mask,
    softmax, weights @ v. (transformers' own eager_attention_forward runs its softmax in float32, so it
    cannot be the float64 oracle.) Shapes: q (H, T, Dh), k, v (K, S, Dh), mask (T, S) -> (H, T, Dh)"""
    G = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(G, dim=0), v.repeat_interleave(G, dim=0)  # transformers' repeat_kv
    scores = q @ k.transpose(1, 2) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~torch.as_tensor(mask), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@FEW
@given(seed=seeds, hk=heads, T=odd, past=st.integers(0, 4), dh=head_dims,
       window=st.sampled_from([None, 1, 2, 3, 6]), cap=st.sampled_from([None, 0.6, 4.0]))
def test_attention_backward(seed, hk, T, past, dh, window, cap):
    """Queries at the last T of S = T + past positions (as after a prefix), causal, sliding or not."""
    H, K = hk
    S = T + past
    rng = np.random.default_rng(seed)
    q, k, v = draw(rng, H, T, dh), draw(rng, K, S, dh), draw(rng, K, S, dh)
    dout = draw(rng, H, T, dh)
    mask = layers.attention_mask(np.arange(past, S), np.arange(S), window)
    scale = dh**-0.5 * 2.0
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    y = torch_attention(tq, tk, tv, mask, scale, cap)
    dq_ref, dk_ref, dv_ref = grads_of(y, dout, tq, tk, tv)

    probs = layers.attention_probs(q, k, mask, scale, cap)
    assert probs.dtype == np.float64
    assert_close(layers.attention(q, k, v, mask, scale, cap), y.detach().numpy())
    dq, dk, dv = layers.attention_backward(dout, q, k, v, mask, scale, cap, probs)
    assert_close(dq, dq_ref)
    assert_close(dk, dk_ref)
    assert_close(dv, dv_ref)


# ---- MLP -------------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, T=odd, d=st.integers(1, 9), f=st.integers(1, 13))
def test_mlp_backward(seed, T, d, f):
    rng = np.random.default_rng(seed)
    x, gate, up, down, dout = (draw(rng, T, d), draw(rng, f, d), draw(rng, f, d), draw(rng, d, f),
                               draw(rng, T, d))
    tx, tg, tu, td = (leaf(a) for a in (x, gate, up, down))
    act = ACT2FN["gelu_pytorch_tanh"]
    y = (act(tx @ tg.T) * (tx @ tu.T)) @ td.T  # transformers GemmaMLP
    refs = grads_of(y, dout, tx, tg, tu, td)

    dgate, dup, ddown = np.zeros_like(gate), np.zeros_like(up), np.zeros_like(down)
    dx = layers.mlp_backward(dout, x, gate, up, down, x @ gate.T, x @ up.T, dgate, dup, ddown)
    for ours, ref in zip((dx, dgate, dup, ddown), refs):
        assert_close(ours, ref)
    # frozen weights: the same dx, and no weight gradient asked for
    assert_close(layers.mlp_backward(dout, x, gate, up, down, x @ gate.T, x @ up.T), refs[0])


# ---- linear, for every weight type -----------------------------------------------------------------------

@FEW
@given(seed=seeds, T=odd, out=st.integers(1, 11), inp=st.integers(1, 11))
def test_linear_backward_float(seed, T, out, inp):
    rng = np.random.default_rng(seed)
    x, w, dout = draw(rng, T, inp), draw(rng, out, inp), draw(rng, T, out)
    tx, tw = leaf(x), leaf(w)
    dx_ref, dw_ref = grads_of(tx @ tw.T, dout, tx, tw)
    dw = np.zeros_like(w)
    assert_close(layers.linear_backward(dout, x, w, dw), dx_ref)
    assert_close(dw, dw_ref)
    assert_close(layers.linear_backward(dout, x, w), dx_ref)  # frozen


def test_linear_backward_weight_gradient_in_blocks(monkeypatch):
    """dW is added a block of rows at a time (no (out, in) temporary): blocks of 3 rows, 70 rows."""
    rng = np.random.default_rng(8)
    x, w, dout = draw(rng, 5, 9), draw(rng, 70, 9), draw(rng, 5, 70)
    monkeypatch.setattr(weights, "BLOCK_BYTES", 4 * 9 * 3)
    tx, tw = leaf(x), leaf(w)
    _, dw_ref = grads_of(tx @ tw.T, dout, tx, tw)
    dw = np.ones_like(w)
    layers.linear_backward(dout, x, w, dw)
    assert_close(dw, 1 + dw_ref)


@FEW
@given(seed=seeds, T=odd, out=st.integers(1, 11), inp=st.integers(1, 11), r=st.integers(1, 4),
       base_kind=st.sampled_from(["float", "int8", "int4"]))
def test_linear_backward_lora(seed, T, out, inp, r, base_kind):
    """A LoRA weight: the base is frozen (only dx through it), A and B get gradients (PEFT's lora_A, lora_B)."""
    rng = np.random.default_rng(seed)
    width = 32 * ((inp + 31) // 32) if base_kind != "float" else inp  # quantized rows are whole groups of 32
    x, base, dout = draw(rng, T, width), draw(rng, out, width), draw(rng, T, out)
    A, B, scale = draw(rng, r, width), draw(rng, out, r), 1.7
    stored = {"float": lambda w: w, "int8": weights.Int8.from_float,
              "int4": weights.Int4.from_float}[base_kind](base.astype(np.float32) if base_kind != "float" else base)
    w = weights.LoRA(stored, A, B, scale)
    tx, tA, tB = leaf(x), leaf(A), leaf(B)
    W = torch.as_tensor(weights.dequantize(stored).astype(np.float64))
    y = tx @ W.T + scale * (tx @ tA.T) @ tB.T  # peft LoraLayer: base(x) + lora_B(lora_A(x)) * scaling
    dx_ref, dA_ref, dB_ref = grads_of(y, dout, tx, tA, tB)
    dA, dB = np.zeros_like(A), np.zeros_like(B)
    assert_close(layers.linear_backward(dout, x, w, (dA, dB)), dx_ref)
    assert_close(dA, dA_ref)
    assert_close(dB, dB_ref)


STORED = {
    "bfloat16": lambda w: weights.Float16Bits.from_float(w, "bfloat16"),
    "float16": lambda w: weights.Float16Bits.from_float(w, "float16"),
    "int8": weights.Int8.from_float,
    "int4": weights.Int4.from_float,
    "int8x64": lambda w: Int8x64.pack(weights.Int8.from_float(w)),  # the Numba backend's layouts
    "int4x64": lambda w: Int4x64.pack(weights.Int4.from_float(w)),
}


@pytest.mark.parametrize("kind", STORED)
def test_linear_backward_stored(kind, monkeypatch):
    """dx through a 16-bit or quantized weight equals torch's on the dequantized matrix, in float64, made a
    block of rows at a time: blocks are shrunk to 3 rows here so that 70 rows make 24 of them, the last short."""
    rng = np.random.default_rng(7)
    T, out, inp = 5, 70, 96
    w = STORED[kind](draw(rng, out, inp).astype(np.float32))
    x, dout = draw(rng, T, inp), draw(rng, T, out)
    monkeypatch.setattr(weights, "BLOCK_BYTES", 4 * inp * 3)
    assert weights.block_rows(inp) == 3
    widened = []
    rows = w.rows
    monkeypatch.setattr(w, "rows", lambda a, b: widened.append(b - a) or rows(a, b), raising=False)
    tx = leaf(x)
    W = torch.as_tensor(rows(0, out).astype(np.float64))  # the dequantized matrix
    (dx_ref,) = grads_of(tx @ W.T, dout, tx)
    dx = layers.linear_backward(dout, x, w)
    assert dx.dtype == np.float64
    assert_close(dx, dx_ref)
    assert max(widened) == 3 and sum(widened) == out  # never more than a block widened at once


# ---- embedding -------------------------------------------------------------------------------------------

@FEW
@given(seed=seeds, T=odd, V=st.integers(1, 7), D=st.integers(1, 9))
def test_embed_backward(seed, T, V, D):
    """Repeated token ids add their gradients (the trap of `dtable[ids] += ...`)."""
    rng = np.random.default_rng(seed)
    table, ids, dout = draw(rng, V, D), rng.integers(0, V, T), draw(rng, T, D)
    scale = np.sqrt(D)
    tt = leaf(table)
    y = torch.nn.functional.embedding(torch.as_tensor(ids), tt) * scale
    (dt_ref,) = grads_of(y, dout, tt)
    assert_close(layers.embed(ids, table, scale), y.detach().numpy())
    dt = np.zeros_like(table)
    layers.embed_backward(dout, ids, scale, dt)
    assert_close(dt, dt_ref)
    layers.embed_backward(dout, ids, scale, None)  # a frozen table: nothing to do, nothing fails
