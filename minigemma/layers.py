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
