"""The parts of a Gemma transformer, one NumPy function each: arrays in, array out, no hidden state.

Shapes use the glossary in config.py (T new tokens, S attended positions, D hidden, H query heads,
K kv heads, G = H/K, Dh head dim, F MLP width, V vocab). Everything is computed in float32: the norms,
softmax and RoPE must be (transformers#29402, #29285), and keeping one dtype keeps the reference simple.

This module is the NumPy reference backend and a leaf: it imports nothing else of minigemma's but the weight
types. `linear`, `embedding_rows`, `causal_attention`, `rms_norm` and `apply_rope` are the hot operations; a model
runs them through its backend (kernels.py), which is either these functions or their Numba twins
(kernels_numba.py).

Training (train.py) needs the gradient of each part: every forward that has parameters or sits on the path of
one is followed by its `<name>_backward`, as in llm.c. A backward takes the upstream gradient `dout` first,
then the forward's arguments it needs and what the forward saved, and returns the gradient of its input;
gradients of parameters are *added* into arrays the caller passes (llm.c's `+=`), so a caller can sum them
over a batch, and a frozen parameter (None) costs nothing. The forwards compute in float32, or in float64 when
given float64 (the gradient tests check against torch in float64); inference is always float32.
"""

from __future__ import annotations

import numpy as np

from .weights import LoRA, block_rows

f32 = np.float32


def compute_dtype(*arrays) -> np.dtype:
    """float32, or float64 if any input is float64: the precision a forward or backward works in."""
    return np.result_type(f32, *[a.dtype for a in arrays])


def const(x: np.ndarray, value: float):
    """A constant in x's precision: float32 for inference, exact for the float64 gradient tests."""
    return compute_dtype(x).type(value)


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T, a bias-free linear layer with the weight stored (out, in) as in Hugging Face and GGUF.

    `w` is a float32 ndarray or any weight type of weights.py (16-bit, int8, int4). For a stored type this is
    the readable definition: dequantize a block of rows to float32, multiply, move on. It never widens a whole
    matrix at once: a float16 LM head of the 270M model widened in full would be 670 MB per token.

    A LoRA weight (weights.LoRA) is its base product plus the low-rank update, never a merged matrix.

    Shapes: (T, in), (out, in) -> (T, out) float32
    """
    if isinstance(w, np.ndarray):
        return x @ w.T
    if isinstance(w, LoRA):
        return linear(x, w.base) + lora_update(x, w)
    out_features, in_features = w.shape
    out = np.empty((x.shape[0], out_features), compute_dtype(x))
    step = block_rows(in_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = x @ w.rows(start, stop).T  # (T, in) @ (in, R) -> (T, R)
    return out


def linears(x: np.ndarray, *ws) -> list:
    """[linear(x, w) for w in ws]: the products of one input with several matrices (q, k and v; gate and up).
    A backend's twin may make them in one pass (kernels_numba.linears). A None weight (a projection the layer
    does not have) gives None.

    Shapes: (T, in), (out_i, in) each -> [(T, out_i)]
    """
    return [None if w is None else linear(x, w) for w in ws]


def linear_backward(dout: np.ndarray, x: np.ndarray, w, dw=None) -> np.ndarray:
    """The gradient of linear(x, w) with respect to x, and (when asked) to the weight.

        y = x W^T   =>   dx = dy W,   dW = dy^T x
    For a stored weight (16-bit, int8, int4, or a backend's packed layout) dx is made as the forward makes y:
    a block of rows of W is widened to float32, multiplied, dropped, so the matrix is never widened whole.
    `dw` is where the weight's gradient is added (`+=`): an (out, in) array for a float32 weight, the pair
    (dA, dB) for a LoRA weight (lora_update_backward), or None for a frozen weight (no work spent on it).
    Stored weights are always frozen (a gradient step cannot be taken on an int8 grid): train them with LoRA.

    Shapes: dout (T, out), x (T, in), w (out, in) -> dx (T, in)
    """
    if isinstance(w, LoRA):
        dx = linear_backward(dout, x, w.base)  # the base is frozen: only its dx
        return dx + lora_update_backward(dout, x, w, *(dw if dw is not None else (None, None)))
    if isinstance(w, np.ndarray):
        if dw is not None:  # a block of rows at a time: no (out, in) temporary beside dw (the LM head's is 671 MB)
            step = block_rows(x.shape[1])
            for start in range(0, dw.shape[0], step):
                dw[start:start + step] += dout[:, start:start + step].T @ x  # (R, T) @ (T, in)
        return dout @ w  # (T, out) @ (out, in)
    out_features, in_features = w.shape
    dx = np.zeros((dout.shape[0], in_features), compute_dtype(dout))
    step = block_rows(in_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        dx += dout[:, start:stop] @ w.rows(start, stop)  # (T, R) @ (R, in)
    return dx


def lora_update(x: np.ndarray, w: LoRA) -> np.ndarray:
    """The LoRA branch of a linear layer: scale * (x @ A.T) @ B.T. Shapes: (T, in) -> (T, r) -> (T, out)"""
    return (x @ w.A.T) @ (const(x, w.scale) * w.B).T


def lora_update_backward(dout: np.ndarray, x: np.ndarray, w: LoRA, dA=None, dB=None) -> np.ndarray:
    """The gradient of lora_update: with z = x A^T (the rank-r bottleneck) and y = s z B^T,
        dB = s dy^T z,   dz = s dy B,   dA = dz^T x,   dx = dz A
    dA and dB (if given) are added into; returns dx. Shapes: dout (T, out), x (T, in) -> dx (T, in)
    """
    s = const(dout, w.scale)
    z = x @ w.A.T  # (T, r), recomputed: r numbers per token, cheaper to redo than to keep
    dz = (s * dout) @ w.B  # (T, out) @ (out, r) -> (T, r)
    if dB is not None:
        dB += s * (dout.T @ z)  # (out, T) @ (T, r)
    if dA is not None:
        dA += dz.T @ x  # (r, T) @ (T, in)
    return dz @ w.A  # (T, r) @ (r, in)


def embedding_rows(table, token_ids: np.ndarray) -> np.ndarray:
    """The rows of the embedding table for these token ids, as float32, whatever the table's weight type.

    Shapes: (V, D), (T,) int -> (T, D)
    """
    if isinstance(table, np.ndarray):
        return table[token_ids].astype(compute_dtype(table), copy=False)
    if hasattr(table, "take"):  # the Numba backend's packed layouts gather rows directly (packed.Int8x64)
        return table.take(token_ids)
    return np.concatenate([table.rows(i, i + 1) for i in np.asarray(token_ids).tolist()])


def embed(token_ids: np.ndarray, table: np.ndarray, scale: float, rows=embedding_rows) -> np.ndarray:
    """Look up token embeddings and multiply by sqrt(D).

    Gemma scales embeddings by sqrt(hidden_size) because the same matrix is the (tied) output head.
    transformers casts the scale to the weight dtype before multiplying, so in bf16 sqrt(3072) becomes 55.5
    (huggingface/transformers#29402); in float32, as here, it is the float32 square root.

    The table may be stored in any weight type: `rows` (embedding_rows, or a backend's twin) reads the rows
    as float32.

    Shapes: (T,) int, (V, D) -> (T, D)
    """
    x = rows(table, token_ids)
    return x * const(x, scale)


def embed_backward(dout: np.ndarray, token_ids: np.ndarray, scale: float, dtable: np.ndarray | None) -> None:
    """The gradient of embed: each token's row of the table gets scale * (the gradient at that position).

        h_t = s E[id_t]   =>   dE[v] += s sum_{t: id_t = v} dh_t
    A token used twice gets both gradients (np.add.at adds repeated indices, `dtable[ids] +=` would not).
    Nothing to do for a frozen table (None): the input of the model has no gradient.

    Shapes: dout (T, D), (T,) int, dtable (V, D)
    """
    if dtable is not None:
        np.add.at(dtable, token_ids, dout * const(dout, scale))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with Gemma's (1 + w) gain.

    Gemma stores the gain zero-centred: the weight is initialised to 0 and the layer multiplies by (1 + w)
    (transformers GemmaRMSNorm, gemma_pytorch RMSNorm(add_unit_offset=True)). Loading a GGUF file undoes
    llama.cpp's converter, which bakes the +1 into the stored weight.

    Shapes: (..., N), (N,) -> (..., N)
    """
    dtype = compute_dtype(x)
    x = x.astype(dtype, copy=False)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + const(x, eps))
    return x / rms * (f32(1.0) + weight.astype(dtype, copy=False))


def rms_norm_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float,
                      dweight: np.ndarray | None = None) -> np.ndarray:
    """The gradient of rms_norm. With r = (mean(x^2) + eps)^-1/2, x^ = r x and y = x^ (1 + w):
        dw += sum over rows of dy x^,   dx = r (g - x^ mean(g x^)) with g = dy (1 + w)
    (the second term is the gradient through r: every element of a row moves its rms).

    Shapes: dout (..., N), x (..., N), weight (N,) -> dx (..., N)
    """
    dtype = compute_dtype(x, dout)
    x = x.astype(dtype, copy=False)
    r = f32(1.0) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + const(x, eps))  # (..., 1)
    x_hat = x * r
    if dweight is not None:
        dweight += (dout * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
    g = dout * (f32(1.0) + weight.astype(dtype, copy=False))
    return r * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))


def rope_angles(positions: np.ndarray, head_dim: int, theta: float, factor: float = 1.0):
    """cos and sin of the rotary angles pos * inv_freq_i, i = 0 .. Dh/2-1, each repeated twice.

    inv_freq_i = theta^(-2i/Dh) / factor, in float32 as transformers computes it. `factor` is linear scaling
    ("position interpolation"), used by Gemma 3 4B+ on global layers only.

    Shapes: (T,) -> cos (T, Dh), sin (T, Dh)
    """
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    inv_freq = inv_freq / f32(factor)
    angles = positions.astype(f32)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, Dh/2) -> (T, Dh)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each pair (x_i, x_{i+Dh/2}) by its angle: the split-half ("rotate_half") layout.

    Gemma pairs element i with element i + Dh/2, not with 2i+1 as Meta's Llama code does (gemma.cpp
    ops-inl.h Rope: "we choose to rotate the pairs of dimensions v_i and v_{i + d//2}").

    Shapes: (N, T, Dh), (T, Dh), (T, Dh) -> (N, T, Dh)
    """
    half = x.shape[-1] // 2
    # x cos + rotate_half(x) sin, with rotate_half(x) = (-x2, x1), written into one new array
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def apply_rope_backward(dout: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The gradient of apply_rope: a rotation is linear, so its gradient is the rotation by minus the angle.
        y = x cos + R(x) sin, R(x) = (-x2, x1)   =>   dx = dy cos + R^T(dy sin) = dy cos - R(dy sin)
    (R is a quarter turn, so R^T = -R). x itself is not needed.

    Shapes: dout (..., T, Dh), (T, Dh), (T, Dh) -> (..., T, Dh)
    """
    half = dout.shape[-1] // 2
    ds = dout * sin
    return dout * cos + np.concatenate([ds[..., half:], -ds[..., :half]], axis=-1)  # - rotate_half(ds)


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """Gemma 2's soft-capping: squash smoothly into (-cap, cap). None means no cap.

    Shapes: (...) -> (...)
    """
    if cap is None:
        return x
    return const(x, cap) * np.tanh(x / const(x, cap))


def softcap_backward(dout: np.ndarray, x: np.ndarray, cap: float | None) -> np.ndarray:
    """The gradient of softcap: y = c tanh(x / c)  =>  dx = dy (1 - tanh(x / c)^2). Shapes: (...) -> (...)"""
    if cap is None:
        return dout
    t = np.tanh(x / const(x, cap))
    return dout * (1 - t * t)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32; -inf entries get probability 0 (each row needs one finite).

    Shapes: (..., N) -> (..., N)
    """
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """Which keys each query may see: causal, and on sliding layers only the last `window` positions.

    A query at position i sees keys j with  i - W < j <= i  (W keys including itself): transformers'
    sliding_window_overlay `kv_idx > q_idx - W`; gemma_pytorch, gemma.cpp and llama.cpp agree.
    Built from absolute positions, so it is right whatever the KV cache holds.

    Shapes: (T,), (S,) -> (T, S) bool
    """
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def attention_probs(q: np.ndarray, k: np.ndarray, mask: np.ndarray, scale: float, cap: float | None) -> np.ndarray:
    """How much each query head attends to each key: scaled scores, soft-cap, mask, softmax.

    Query head h uses kv head h // G (transformers' repeat_kv): with K = 1 this is multi-query attention
    (gemma-2b), with K = H multi-head (gemma-7b), in between grouped-query (gemma-2-2b). Instead of copying
    each kv head G times we fold the G query heads that share it into the row axis of one matmul.
    Order matters on Gemma 2: scale, then soft-cap, then mask, then softmax (transformers
    eager_attention_forward, gemma_pytorch GemmaAttention): capping after the mask would turn the masked
    -inf into -cap and leak weight to future tokens.

    Shapes: q (H, T, Dh), k (K, S, Dh), mask (T, S) -> (H, T, S)
    """
    H, T, Dh = q.shape
    K = k.shape[0]
    G = H // K
    qg = q.reshape(K, G * T, Dh)  # (H, T, Dh) -> (K, G*T, Dh): heads h = kv*G + g share kv head `kv`
    scores = (qg @ k.transpose(0, 2, 1)) * const(q, scale)  # (K, G*T, S)
    scores = softcap(scores, cap)
    scores = scores.reshape(K, G, T, -1)  # (K, G*T, S) -> (K, G, T, S)
    scores = np.where(mask, scores, f32(-np.inf))
    return softmax(scores).reshape(H, T, -1)  # (K, G, T, S) -> (H, T, S)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
              scale: float, cap: float | None) -> np.ndarray:
    """Scaled dot-product attention with grouped KV heads, soft-cap and mask: attention_probs @ v.

    Shapes: q (H, T, Dh), k (K, S, Dh), v (K, S, Dh), mask (T, S) -> (H, T, Dh)
    """
    H, T, Dh = q.shape
    K = k.shape[0]
    probs = attention_probs(q, k, mask, scale, cap)  # (H, T, S)
    probs = probs.reshape(K, (H // K) * T, -1)  # (H, T, S) -> (K, G*T, S): the G heads sharing a kv head
    out = probs @ v  # (K, G*T, S) @ (K, S, Dh) -> (K, G*T, Dh)
    return out.reshape(H, T, Dh)  # (K, G*T, Dh) -> (H, T, Dh)


def attention_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
                       scale: float, cap: float | None, probs: np.ndarray):
    """The gradients of attention with respect to q, k and v, back through the steps of attention_probs.

        o = P v                         =>  dv = P^T do,   dP = do v^T
        P = softmax(z)                  =>  dz = P (dP - sum_j P dP)   (row by row; masked entries have P = 0)
        z = cap tanh(a / cap), a = scale q k^T  =>  da = dz (1 - (z / cap)^2),  dq = scale da k,  dk = scale da^T q
    `probs` is what the forward saved (attention_probs); it is zero where `mask` hides a key, so the mask acts
    through it and no gradient reaches a hidden key. With a soft-cap the capped scores are recomputed from
    q and k (one matmul, cheaper to redo than to keep). A kv head shared by G query heads gets the sum of
    their gradients: the G heads are folded into the rows of one product, as in the forward.

    Shapes: dout (H, T, Dh), q (H, T, Dh), k, v (K, S, Dh), mask (T, S), probs (H, T, S)
            -> dq (H, T, Dh), dk (K, S, Dh), dv (K, S, Dh)
    """
    H, T, Dh = q.shape
    K = k.shape[0]
    p = probs.reshape(K, (H // K) * T, -1)  # (H, T, S) -> (K, G*T, S)
    do = dout.reshape(K, (H // K) * T, Dh)  # (H, T, Dh) -> (K, G*T, Dh)
    dv = p.transpose(0, 2, 1) @ do  # (K, S, G*T) @ (K, G*T, Dh) -> (K, S, Dh)
    dp = do @ v.transpose(0, 2, 1)  # (K, G*T, Dh) @ (K, Dh, S) -> (K, G*T, S)
    dz = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # softmax backward; zero where masked
    qg = q.reshape(K, (H // K) * T, Dh)  # (H, T, Dh) -> (K, G*T, Dh)
    if cap is not None:
        dz = softcap_backward(dz, (qg @ k.transpose(0, 2, 1)) * const(q, scale), cap)
    dz *= const(q, scale)
    dq = (dz @ k).reshape(H, T, Dh)  # (K, G*T, S) @ (K, S, Dh) -> (K, G*T, Dh) -> (H, T, Dh)
    dk = dz.transpose(0, 2, 1) @ qg  # (K, S, G*T) @ (K, G*T, Dh) -> (K, S, Dh)
    return dq, dk, dv


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
                     k_positions: np.ndarray, window: int | None, scale: float, cap: float | None) -> np.ndarray:
    """Attention of queries at `q_positions` over keys at `k_positions`: causal, and on a sliding layer only
    the last `window` positions (attention_mask); then scale, soft-cap, mask, softmax (attention).

    This is the form a backend's attention takes: positions in, not a mask, so that a fast kernel can skip
    the keys a query cannot see instead of building the (T, S) mask.

    Shapes: q (H, T, Dh), k, v (K, S, Dh), (T,), (S,) -> (H, T, Dh)
    """
    return attention(q, k, v, attention_mask(q_positions, k_positions, window), scale, cap)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Gemma was trained with this approximation; exact (erf) GELU was an early bug in ports
    (transformers#29402, gemma_pytorch #37).

    Shapes: (...) -> (...)
    """
    k = compute_dtype(x).type  # float32 in inference
    # the formula step by step in one buffer, in place: as a single expression, which makes a fresh (T, F)
    # temporary at every operation, a 500-token prefill's (T, 2048) GELU took twice as long (AMD EPYC,
    # docs/performance.md)
    y = k(0.044715) * x
    y *= x
    y *= x  # 0.044715 x^3
    y += x
    y *= k(np.sqrt(2.0 / np.pi))  # u
    np.tanh(y, out=y)
    y += k(1.0)
    y *= x
    y *= k(0.5)  # exact (a power of two): the same rounding as 0.5 x (1 + t)
    return y


def gelu_tanh_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The gradient of gelu_tanh. With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u):
        y = x (1 + t) / 2   =>   dy/dx = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2

    Shapes: (...) -> (...)
    """
    k = compute_dtype(x).type
    c = k(np.sqrt(2.0 / np.pi))
    t = np.tanh(c * (x + k(0.044715) * x * x * x))
    return dout * (k(0.5) * (1 + t) + k(0.5) * x * (1 - t * t) * c * (1 + k(3 * 0.044715) * x * x))


def geglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The MLP's gated activation: gelu_tanh(g) * u, element by element. Shapes: (T, F) x2 -> (T, F)"""
    return gelu_tanh(g) * u


def mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, linear=linear,
        linears=linears, geglu=geglu) -> np.ndarray:
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), no biases. `linear`, `linears` and `geglu` are
    this module's, or a backend's twins.

    Shapes: (T, D), gate/up (F, D), down (D, F) -> (T, D)
    """
    g, u = linears(x, gate, up)  # (T, D) -> (T, F) each
    return linear(geglu(g, u), down)  # (T, F) -> (T, D)


def mlp_backward(dout: np.ndarray, x: np.ndarray, gate, up, down, g: np.ndarray, u: np.ndarray,
                 dgate=None, dup=None, ddown=None, linear_backward=linear_backward) -> np.ndarray:
    """The gradient of mlp, from the saved products g = gate(x) and u = up(x):
        y = down(gelu(g) u)   =>   dh = down^T dy,   dg = dh u gelu'(g),   du = dh gelu(g),
                                   dx = gate^T dg + up^T du
    dgate, dup, ddown receive the weights' gradients as linear_backward's `dw` does (None: frozen).
    `linear_backward` is this module's, or a caller's that adds to it (train.py's LoRA dropout).

    Shapes: dout (T, D), x (T, D), gate/up (F, D), down (D, F), g, u (T, F) -> dx (T, D)
    """
    act = gelu_tanh(g)
    dh = linear_backward(dout, act * u, down, ddown)  # (T, D) -> (T, F)
    dx = linear_backward(gelu_tanh_backward(dh * u, g), x, gate, dgate)
    return dx + linear_backward(dh * act, x, up, dup)  # (T, F) -> (T, D)


# ---- Gemma 4 -----------------------------------------------------------------------------------------------------
# What Gemma 4's text decoder adds, one function per part (transformers models/gemma4/modeling_gemma4.py).
# Extra shape letters: L layers, P hidden_size_per_layer_input, E experts, k top_k_experts, I moe_intermediate_size.
# model.py calls each only where its config field says so.

def proportional_rope_angles(positions: np.ndarray, head_dim: int, theta: float, factor: float,
                             partial_rotary_factor: float):
    """cos and sin for Gemma 4's "proportional" RoPE (global layers): only the first
    int(partial_rotary_factor * Dh / 2) pairs rotate, with inv_freq_i = theta^(-2i/Dh) of the *full* head dim;
    the other pairs get frequency 0, so cos = 1 and sin = 0 there and they pass through unrotated.

    Why: the global layers have a big head (512) and see the whole context; rotating only a quarter of the
    pairs keeps most dimensions free of position, for content (transformers _compute_proportional_rope_parameters;
    llama.cpp gets the same with frequency factors of 1e30 on the unrotated pairs, its rope_freqs tensor).

    Shapes: (T,) -> cos (T, Dh), sin (T, Dh)
    """
    pairs = int(partial_rotary_factor * head_dim // 2)  # as transformers rounds it
    inv_freq = np.zeros(head_dim // 2, f32)
    inv_freq[:pairs] = f32(1.0) / (f32(theta) ** (np.arange(0, 2 * pairs, 2, dtype=f32) / f32(head_dim)))
    inv_freq = inv_freq / f32(factor)
    angles = positions.astype(f32)[:, None] * inv_freq[None, :]  # (T, Dh/2), zeros past the rotated pairs
    angles = np.concatenate([angles, angles], axis=-1)  # (T, Dh/2) -> (T, Dh): split-half pairing as apply_rope
    return np.cos(angles), np.sin(angles)


def per_layer_inputs(token_rows: np.ndarray, x: np.ndarray, model_proj, norm: np.ndarray, eps: float,
                     num_layers: int, linear=linear, rms_norm=rms_norm) -> np.ndarray:
    """Gemma 4's per-layer embeddings (the E-series): a small input for every layer, from the token and from
    its embedding.

    `token_rows` are the token's rows of the packed per-layer table, already times sqrt(P) (embed). The
    embedding x (already times sqrt(D)) is projected to all L*P at once and scaled by 1/sqrt(D), each layer's
    P-slice RMS-normalised; the two parts are summed and scaled by 1/sqrt(2) (transformers
    Gemma4TextModel.get_per_layer_inputs, project_per_layer_inputs).

    Shapes: token_rows (T, L*P), x (T, D), model_proj (L*P, D), norm (P,) -> (T, L, P)
    """
    T, D = x.shape
    from_x = linear(x, model_proj) * const(x, D**-0.5)  # (T, D) -> (T, L*P)
    from_x = rms_norm(from_x.reshape(T, num_layers, -1), norm, eps)  # (T, L*P) -> (T, L, P), normed per layer
    return (from_x + token_rows.reshape(T, num_layers, -1)) * const(x, 2.0**-0.5)


def per_layer_inputs_backward(dout: np.ndarray, token_rows: np.ndarray, x: np.ndarray, model_proj, norm: np.ndarray,
                              eps: float, num_layers: int, dmodel_proj=None, dnorm=None, linear=linear,
                              linear_backward=linear_backward):
    """The gradient of per_layer_inputs. With a = x W^T / sqrt(D) in L slices of P, y = (rms_norm(a) + t) / sqrt(2):
        dt = dy / sqrt(2),   da = rms_norm_backward(dy / sqrt(2)) / sqrt(D),   dx = da W,   dW += da^T x
    dt goes to the token's rows of the packed per-layer table (embed_backward with sqrt(P)), dx into the main
    embedding: the one gradient of the E-series that reaches the embedding without passing through a block.
    a is recomputed (one product), as it is cheaper to redo than to keep; token_rows is not needed (y is linear in it).

    Shapes: dout (T, L, P), token_rows (T, L*P), x (T, D), model_proj (L*P, D), norm (P,)
            -> dtoken_rows (T, L*P), dx (T, D)
    """
    T, D = x.shape
    dy = dout * const(dout, 2.0**-0.5)  # (T, L, P): the token rows' share, and the normed projection's
    a = linear(x, model_proj) * const(x, D**-0.5)  # (T, D) -> (T, L*P)
    da = rms_norm_backward(dy, a.reshape(T, num_layers, -1), norm, eps, dnorm).reshape(T, -1)  # -> (T, L*P)
    dx = linear_backward(da * const(da, D**-0.5), x, model_proj, dmodel_proj)  # (T, L*P) -> (T, D)
    return dy.reshape(T, -1), dx


def per_layer_branch(x: np.ndarray, layer_input: np.ndarray, gate, proj, norm: np.ndarray, eps: float,
                     linear=linear, rms_norm=rms_norm) -> np.ndarray:
    """The third residual branch of a Gemma 4 E-series block: the stream gated down to P, times this layer's
    per-layer input, projected back to D and normalised (transformers Gemma4TextDecoderLayer.forward):
        norm(proj(gelu_tanh(gate(x)) * layer_input))

    Shapes: x (T, D), layer_input (T, P), gate (P, D), proj (D, P), norm (D,) -> (T, D)
    """
    h = gelu_tanh(linear(x, gate)) * layer_input  # (T, D) -> (T, P)
    return rms_norm(linear(h, proj), norm, eps)  # (T, P) -> (T, D)


def per_layer_branch_backward(dout: np.ndarray, x: np.ndarray, layer_input: np.ndarray, gate, proj, norm: np.ndarray,
                              eps: float, dgate=None, dproj=None, dnorm=None, linear=linear,
                              linear_backward=linear_backward):
    """The gradient of per_layer_branch. With g = gate(x), h = gelu(g) u (u the layer input), y = norm(proj(h)):
        dh = proj^T rms_norm_backward(dy),   du = dh gelu(g),   dx = gate^T (dh u gelu'(g))
    g and proj(h) are recomputed: P and D numbers per token, cheaper to redo than to keep.
    Returns the gradient of x and of this layer's input (which goes back to per_layer_inputs_backward).

    Shapes: dout (T, D), x (T, D), layer_input (T, P), gate (P, D), proj (D, P), norm (D,)
            -> dx (T, D), dlayer_input (T, P)
    """
    g = linear(x, gate)  # (T, D) -> (T, P)
    act = gelu_tanh(g)
    h = act * layer_input
    dy = rms_norm_backward(dout, linear(h, proj), norm, eps, dnorm)  # (T, D)
    dh = linear_backward(dy, h, proj, dproj)  # (T, D) -> (T, P)
    dx = linear_backward(gelu_tanh_backward(dh * layer_input, g), x, gate, dgate)  # (T, P) -> (T, D)
    return dx, dh * act


def route(x: np.ndarray, scale: np.ndarray, proj, expert_scale: np.ndarray, top_k: int, eps: float,
          linear=linear, rms_norm=rms_norm):
    """Gemma 4's MoE router: which top_k experts each token goes to, and with what weight.

    The input is RMS-normalised without a gain, scaled per dimension and by 1/sqrt(D), projected to one score
    per expert; a softmax over all experts (float32), the top_k kept and renormalised to sum to 1, then each
    multiplied by its expert's learned scale (transformers Gemma4TextRouter).

    Shapes: x (T, D), scale (D,), proj (E, D), expert_scale (E,) -> weights (T, k), experts (T, k) int
    """
    D = x.shape[-1]
    h = rms_norm(x, np.zeros(D, f32), eps) * scale * const(x, D**-0.5)  # gain 0 zero-centred: no gain
    probs = softmax(linear(h, proj))  # (T, D) -> (T, E)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # (T, k), most probable first
    weights = np.take_along_axis(probs, experts, axis=-1)  # (T, k)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * expert_scale[experts], experts


def route_backward(dout: np.ndarray, x: np.ndarray, scale: np.ndarray, proj, expert_scale: np.ndarray,
                   chosen: np.ndarray, eps: float, dscale=None, dproj=None, dexpert_scale=None, linear=linear,
                   linear_backward=linear_backward) -> np.ndarray:
    """The gradient of route's weights (the choice of experts is piecewise constant: no gradient through it).
    With p = softmax(z), w = p[chosen], r = w / sum(w) and out = r s[chosen] (s the expert scales):
        ds[e] += sum of dout r where e was chosen,   dr = dout s[chosen],   dw = (dr - sum(dr r)) / sum(w)
        dz = p (dp - sum(dp p)) with dp = dw at the chosen experts, 0 elsewhere;  then back through
        z = proj(n scale / sqrt(D)), n = rms_norm(x) without a gain.
    The scores are recomputed from x (E numbers per token). `chosen` is what route returned.

    Shapes: dout (T, k), x (T, D), scale (D,), proj (E, D), expert_scale (E,), chosen (T, k) int -> dx (T, D)
    """
    T, D = x.shape
    n = rms_norm(x, np.zeros(D, f32), eps)  # (T, D), no gain
    h = n * scale * const(n, D**-0.5)
    probs = softmax(linear(h, proj))  # (T, D) -> (T, E)
    w = np.take_along_axis(probs, chosen, axis=-1)  # (T, k)
    total = w.sum(axis=-1, keepdims=True)
    r = w / total
    if dexpert_scale is not None:
        np.add.at(dexpert_scale, chosen, dout * r)  # an expert chosen by many tokens gets each one's share
    dr = dout * expert_scale[chosen]
    dw = (dr - np.sum(dr * r, axis=-1, keepdims=True)) / total  # through the renormalisation
    dp = np.zeros_like(probs, dtype=compute_dtype(dw, probs))
    np.put_along_axis(dp, chosen, dw, axis=-1)  # the experts not chosen get no gradient
    dz = probs * (dp - np.sum(dp * probs, axis=-1, keepdims=True))  # softmax backward
    dh = linear_backward(dz, h, proj, dproj)  # (T, E) -> (T, D)
    if dscale is not None:
        dscale += (dh * n).sum(axis=0) * const(dh, D**-0.5)
    return rms_norm_backward(dh * scale * const(dh, D**-0.5), x, np.zeros(D, f32), eps)


def experts(x: np.ndarray, weights: np.ndarray, chosen: np.ndarray, gate_up: list, down: list,
            linear=linear) -> np.ndarray:
    """The experts' output: each token's chosen experts, each a small GeGLU MLP, weighted and summed.

    Expert e computes down(gelu_tanh(gate) * up) with its gate and up projections stacked in one (2I, D)
    matrix (transformers Gemma4TextExperts). Each expert runs once, on the tokens that chose it, in expert
    order, as transformers accumulates them.

    Shapes: x (T, D), weights (T, k), chosen (T, k) int, gate_up E x (2I, D), down E x (D, I) -> (T, D)
    """
    out = np.zeros(x.shape, compute_dtype(x, weights))
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)  # the tokens that chose expert e, and in which of their k slots
        gate, up = np.split(linear(x[tokens], gate_up[e]), 2, axis=-1)  # (n, D) -> (n, 2I) -> 2 x (n, I)
        h = linear(gelu_tanh(gate) * up, down[e])  # (n, I) -> (n, D)
        out[tokens] += h * weights[tokens, slot][:, None]  # a token chooses an expert at most once
    return out


def experts_backward(dout: np.ndarray, x: np.ndarray, weights: np.ndarray, chosen: np.ndarray, gate_up: list,
                     down: list, dgate_up: list | None = None, ddown: list | None = None, linear=linear,
                     linear_backward=linear_backward):
    """The gradient of experts, one expert at a time on the tokens that chose it. For a token's expert e with
    weight w: y += w down(gelu(g) u), [g, u] = gate_up(x), so
        dw = <dy, down(gelu(g) u)>,   dm = down^T (w dy),   dg = dm u gelu'(g),   du = dm gelu(g),
        dx += gate_up^T [dg, du]
    The expert's products are recomputed (as in the forward, only on its tokens). dgate_up and ddown are lists
    of E gradient arrays (or None: frozen). Returns the gradient of x and of the routing weights.

    Shapes: dout (T, D), x (T, D), weights (T, k), chosen (T, k) int, gate_up E x (2I, D), down E x (D, I)
            -> dx (T, D), dweights (T, k)
    """
    dx = np.zeros(x.shape, compute_dtype(x, dout))
    dweights = np.zeros(weights.shape, compute_dtype(weights, dout))
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)  # each token at most once: dx[tokens] += adds without collisions
        a = linear(x[tokens], gate_up[e])  # (n, D) -> (n, 2I)
        gate, up = np.split(a, 2, axis=-1)  # 2 x (n, I)
        act = gelu_tanh(gate)
        m = act * up
        h = linear(m, down[e])  # (n, I) -> (n, D)
        dweights[tokens, slot] = np.sum(dout[tokens] * h, axis=-1)
        dm = linear_backward(dout[tokens] * weights[tokens, slot][:, None], m, down[e],
                             None if ddown is None else ddown[e])  # (n, D) -> (n, I)
        da = np.concatenate([gelu_tanh_backward(dm * up, gate), dm * act], axis=-1)  # (n, 2I)
        dx[tokens] += linear_backward(da, x[tokens], gate_up[e], None if dgate_up is None else dgate_up[e])
    return dx, dweights
