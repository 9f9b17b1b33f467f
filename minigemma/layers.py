"""The parts of a Gemma transformer, one NumPy function each: arrays in, array out, no hidden state.

Shapes use the glossary in config.py (T new tokens, S attended positions, D hidden, H query heads,
K kv heads, G = H/K, Dh head dim, F MLP width, V vocab). Everything is computed in float32: the norms,
softmax and RoPE must be (transformers#29402, #29285), and keeping one dtype keeps the reference simple.

This module is the NumPy reference backend and a leaf: it imports nothing else of minigemma's but the weight
types. `linear`, `embedding_rows`, `causal_attention` and `rms_norm` are the hot operations; a model runs them
through its backend (kernels.py), which is either these functions or their Numba twins (kernels_numba.py).
"""

from __future__ import annotations

import numpy as np

from .weights import LoRA, block_rows

f32 = np.float32


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
    out = np.empty((x.shape[0], out_features), f32)
    step = block_rows(in_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = x @ w.rows(start, stop).T  # (T, in) @ (in, R) -> (T, R)
    return out


def lora_update(x: np.ndarray, w: LoRA) -> np.ndarray:
    """The LoRA branch of a linear layer: scale * (x @ A.T) @ B.T. Shapes: (T, in) -> (T, r) -> (T, out)"""
    return (x @ w.A.T) @ (np.float32(w.scale) * w.B).T


def embedding_rows(table, token_ids: np.ndarray) -> np.ndarray:
    """The rows of the embedding table for these token ids, as float32, whatever the table's weight type.

    Shapes: (V, D), (T,) int -> (T, D)
    """
    if isinstance(table, np.ndarray):
        return table[token_ids].astype(f32, copy=False)
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
    return rows(table, token_ids) * f32(scale)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with Gemma's (1 + w) gain.

    Gemma stores the gain zero-centred: the weight is initialised to 0 and the layer multiplies by (1 + w)
    (transformers GemmaRMSNorm, gemma_pytorch RMSNorm(add_unit_offset=True)). Loading a GGUF file undoes
    llama.cpp's converter, which bakes the +1 into the stored weight.

    Shapes: (..., N), (N,) -> (..., N)
    """
    x = x.astype(f32, copy=False)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + f32(eps))
    return x / rms * (f32(1.0) + weight.astype(f32, copy=False))


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
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """Gemma 2's soft-capping: squash smoothly into (-cap, cap). None means no cap.

    Shapes: (...) -> (...)
    """
    if cap is None:
        return x
    return f32(cap) * np.tanh(x / f32(cap))


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
    scores = (qg @ k.transpose(0, 2, 1)) * f32(scale)  # (K, G*T, S)
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
    return f32(0.5) * x * (f32(1.0) + np.tanh(f32(np.sqrt(2.0 / np.pi)) * (x + f32(0.044715) * x * x * x)))


def mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, linear=linear) -> np.ndarray:
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), no biases. `linear` is this module's, or a
    backend's twin.

    Shapes: (T, D), gate/up (F, D), down (D, F) -> (T, D)
    """
    return linear(gelu_tanh(linear(x, gate)) * linear(x, up), down)  # (T, F) -> (T, D)


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
    from_x = linear(x, model_proj) * f32(D**-0.5)  # (T, D) -> (T, L*P)
    from_x = rms_norm(from_x.reshape(T, num_layers, -1), norm, eps)  # (T, L*P) -> (T, L, P), normed per layer
    return (from_x + token_rows.reshape(T, num_layers, -1)) * f32(2.0**-0.5)


def per_layer_branch(x: np.ndarray, layer_input: np.ndarray, gate, proj, norm: np.ndarray, eps: float,
                     linear=linear, rms_norm=rms_norm) -> np.ndarray:
    """The third residual branch of a Gemma 4 E-series block: the stream gated down to P, times this layer's
    per-layer input, projected back to D and normalised (transformers Gemma4TextDecoderLayer.forward):
        norm(proj(gelu_tanh(gate(x)) * layer_input))

    Shapes: x (T, D), layer_input (T, P), gate (P, D), proj (D, P), norm (D,) -> (T, D)
    """
    h = gelu_tanh(linear(x, gate)) * layer_input  # (T, D) -> (T, P)
    return rms_norm(linear(h, proj), norm, eps)  # (T, P) -> (T, D)


def route(x: np.ndarray, scale: np.ndarray, proj, expert_scale: np.ndarray, top_k: int, eps: float,
          linear=linear, rms_norm=rms_norm):
    """Gemma 4's MoE router: which top_k experts each token goes to, and with what weight.

    The input is RMS-normalised without a gain, scaled per dimension and by 1/sqrt(D), projected to one score
    per expert; a softmax over all experts (float32), the top_k kept and renormalised to sum to 1, then each
    multiplied by its expert's learned scale (transformers Gemma4TextRouter).

    Shapes: x (T, D), scale (D,), proj (E, D), expert_scale (E,) -> weights (T, k), experts (T, k) int
    """
    D = x.shape[-1]
    h = rms_norm(x, np.zeros(D, f32), eps) * scale * f32(D**-0.5)  # gain 0 zero-centred: no gain
    probs = softmax(linear(h, proj))  # (T, D) -> (T, E)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # (T, k), most probable first
    weights = np.take_along_axis(probs, experts, axis=-1)  # (T, k)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * expert_scale[experts], experts


def experts(x: np.ndarray, weights: np.ndarray, chosen: np.ndarray, gate_up: list, down: list,
            linear=linear) -> np.ndarray:
    """The experts' output: each token's chosen experts, each a small GeGLU MLP, weighted and summed.

    Expert e computes down(gelu_tanh(gate) * up) with its gate and up projections stacked in one (2I, D)
    matrix (transformers Gemma4TextExperts). Each expert runs once, on the tokens that chose it, in expert
    order, as transformers accumulates them.

    Shapes: x (T, D), weights (T, k), chosen (T, k) int, gate_up E x (2I, D), down E x (D, I) -> (T, D)
    """
    out = np.zeros(x.shape, f32)
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)  # the tokens that chose expert e, and in which of their k slots
        gate, up = np.split(linear(x[tokens], gate_up[e]), 2, axis=-1)  # (n, D) -> (n, 2I) -> 2 x (n, I)
        h = linear(gelu_tanh(gate) * up, down[e])  # (n, I) -> (n, D)
        out[tokens] += h * weights[tokens, slot][:, None]  # a token chooses an expert at most once
    return out
