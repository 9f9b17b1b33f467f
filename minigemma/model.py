"""The Gemma forward pass: embedding -> N blocks -> final norm -> tied head, read top to bottom.

Gemma 1 blocks:          x = x + attn(norm(x));              x = x + mlp(norm(x))
Gemma 2/3 ("sandwich"):  x = x + norm(attn(norm(x)));        x = x + norm(mlp(norm(x)))
(transformers Gemma2DecoderLayer / Gemma3DecoderLayer, gemma_pytorch Gemma2DecoderLayer)

`ops` is the model's backend (kernels.py): the products with weight matrices, the embedding lookup, attention
and RMSNorm run through it, the NumPy reference of layers.py or its Numba twins; everything else is layers.py.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .config import GemmaConfig
from .errors import ContextOverflow, InvalidArgument, ModelFileError
from .kvcache import KVCache, LayerCache
from .layers import apply_rope, embed, mlp, rope_angles, softcap
from .params import LayerParams, Params, params_nbytes
from .recording import record


def self_attention(x, p: LayerParams, c: GemmaConfig, ops: kernels.Backend, layer: int, rope, window,
                   kv: LayerCache, positions):
    """Project to heads, (Gemma 3: QK-norm), rotate, cache, attend (over the last `window` positions, or all
    with None), project back.

    Shapes: (T, D) -> (T, D)
    """
    T, H, K, Dh = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = ops.linear(x, p.q_proj).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, H*Dh) -> (H, T, Dh)
    k = ops.linear(x, p.k_proj).reshape(T, K, Dh).transpose(1, 0, 2)  # (T, K*Dh) -> (K, T, Dh)
    v = ops.linear(x, p.v_proj).reshape(T, K, Dh).transpose(1, 0, 2)  # (T, K*Dh) -> (K, T, Dh)
    if c.qk_norm:  # Gemma 3 normalises every head before RoPE (transformers Gemma3Attention)
        q = ops.rms_norm(q, p.q_norm, c.rms_norm_eps)
        k = ops.rms_norm(k, p.k_norm, c.rms_norm_eps)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v, k_positions = kv.update(k, v, positions)  # (K, S, Dh) each: the cached positions and these
    record(layer, q=q, k=k, v=v, q_positions=positions, k_positions=k_positions, window=window,
           scale=c.attn_scale, softcap=c.attn_logit_softcapping)  # what the attention pattern is made of
    out = ops.attention(q, k, v, positions, k_positions, window, c.attn_scale,
                        c.attn_logit_softcapping)  # (H, T, Dh)
    return ops.linear(out.transpose(1, 0, 2).reshape(T, H * Dh), p.o_proj)  # (H, T, Dh) -> (T, H*Dh) -> (T, D)


def block(x, p: LayerParams, c: GemmaConfig, ops: kernels.Backend, layer: int, rope, window, kv: LayerCache,
          positions):
    """One transformer block: attention, then the MLP, each as a residual branch. Shapes: (T, D) -> (T, D)"""
    eps = c.rms_norm_eps
    steps = {}  # each value by its name in recording.py, recorded once at the end
    steps["attn_norm"] = h = ops.rms_norm(x, p.input_norm, eps)
    steps["attn_out"] = h = self_attention(h, p, c, ops, layer, rope, window, kv, positions)
    if c.sandwich_norms:  # Gemma 2/3 normalise the branch's output too
        steps["post_attn_norm"] = h = ops.rms_norm(h, p.post_attn_norm, eps)
    steps["resid_mid"] = x = x + h
    steps["mlp_norm"] = h = ops.rms_norm(x, p.pre_mlp_norm, eps)
    steps["mlp_out"] = h = mlp(h, p.gate_proj, p.up_proj, p.down_proj, ops.linear)
    if c.sandwich_norms:
        steps["post_mlp_norm"] = h = ops.rms_norm(h, p.post_mlp_norm, eps)
    steps["resid"] = x = x + h
    record(layer, **steps)
    return x


def forward(params: Params, c: GemmaConfig, token_ids, cache: KVCache, ops: kernels.Backend = kernels.NUMPY,
            last_only: bool = False) -> np.ndarray:
    """Run new tokens through the model, continuing from what `cache` holds.

    Returns float32 logits for every new position, or only the last one with `last_only` (all that sampling
    needs, and it skips a (T, V) matmul). Shapes: (T,) -> (T, V), or (1, V) with last_only
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    positions = np.arange(cache.length, cache.length + len(token_ids))  # (T,)
    if len(token_ids) == 0:
        raise InvalidArgument("forward needs at least one token")
    if positions[-1] >= c.max_position_embeddings:
        raise ContextOverflow(f"position {positions[-1]} is past the context window "
                         f"({c.max_position_embeddings} tokens)")
    if token_ids.min() < 0 or token_ids.max() >= c.vocab_size:
        raise InvalidArgument(f"token ids must be in [0, {c.vocab_size}), got {token_ids.min()}..{token_ids.max()}")

    x = embed(token_ids, params.embed, c.embed_scale, ops.embedding_rows)  # (T, D)
    record(None, embed=x)  # recording (recording.py) costs nothing unless inside `with record_forward()`
    # one cos/sin table per layer type: Gemma 3 uses base 1e6 on global layers and 1e4 on sliding ones
    ropes = {t: rope_angles(positions, c.head_dim, r.theta, r.factor) for t, r in c.rope.items()}
    for i, p in enumerate(params.layers):
        # each layer's choices, made here: its RoPE table and window by its type (sliding or global), its cache
        x = block(x, p, c, ops, i, rope=ropes[c.layer_types[i]], window=c.layer_window(i), kv=cache.layers[i],
                  positions=positions)
    # commit: the layers wrote past cache.length; an exception above left the cache as it was
    cache.length += len(token_ids)

    if last_only:
        x = x[-1:]
    x = ops.rms_norm(x, params.final_norm, c.rms_norm_eps)
    logits = ops.linear(x, params.embed)  # tied head: (T, D) @ (D, V) -> (T, V)
    # Gemma 2 caps the final logits at 30 (transformers Gemma2ForCausalLM, gemma_pytorch Sampler)
    logits = softcap(logits, c.final_logit_softcapping)
    record(None, final_norm=x, logits=logits)
    return logits


class Gemma:
    """A loaded model: config, parameters, the backend that computes with them, and (when the source has one)
    a tokenizer."""

    def __init__(self, config: GemmaConfig, params: Params, tokenizer=None, source: str | None = None,
                 backend: kernels.Backend = kernels.NUMPY):
        self.config = config
        self.params = params
        self.backend = backend  # kernels.NUMPY (the reference) or the Numba twins; params are in its layout
        self._tokenizer = tokenizer
        self.source = source

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ModelFileError(f"{self.source or 'this model'} has no tokenizer (an HF directory needs "
                             "tokenizer.model; a GGUF file needs tokenizer.ggml.* metadata)")
        return self._tokenizer

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as stored (float32, 16-bit, int8 or int4: see weights.py)."""
        return params_nbytes(self.params)

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def forward(self, token_ids) -> np.ndarray:
        """Logits of a fresh sequence starting at position 0. Shapes: (T,) -> (T, V) float32"""
        return forward(self.params, self.config, token_ids, self.new_cache(), self.backend)

    def step(self, token_ids, cache: KVCache, last_only: bool = True) -> np.ndarray:
        """Continue the sequence in `cache` with `token_ids` (prefill or one decode step).

        Shapes: (T,) -> (1, V) with last_only (the default), else (T, V)
        """
        return forward(self.params, self.config, token_ids, cache, self.backend, last_only=last_only)

    def __repr__(self):
        c = self.config
        return (f"Gemma({c.model_type}, {c.num_parameters / 1e6:.0f}M params, {c.num_hidden_layers} layers, "
                f"backend={self.backend.name!r}, source={self.source!r})")
