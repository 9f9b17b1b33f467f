"""The Gemma forward pass: embedding -> N blocks -> final norm -> tied head, read top to bottom.

Gemma 1 blocks:          x = x + attn(norm(x));              x = x + mlp(norm(x))
Gemma 2/3 ("sandwich"):  x = x + norm(attn(norm(x)));        x = x + norm(mlp(norm(x)))
(transformers Gemma2DecoderLayer / Gemma3DecoderLayer, gemma_pytorch Gemma2DecoderLayer)
VaultGemma:              Gemma 2's attention with Gemma 1's block (no output norms)
Gemma 4:                 the sandwich, then (E-series) x = x + norm(proj(gelu(gate(x)) * per_layer_input)),
                         then x = layer_scalar * x; an MoE block adds experts beside the MLP:
                         x = x + norm(norm(mlp(norm(x))) + norm(experts(norm(x))))
(transformers Gemma4TextDecoderLayer)

`ops` is the model's backend (kernels.py): the products with weight matrices, the embedding lookup, attention,
RMSNorm and RoPE run through it, the NumPy reference of layers.py or its Numba twins; everything else is layers.py.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .config import GemmaConfig, Rope
from .errors import ContextOverflow, InvalidArgument, ModelFileError
from .kvcache import KVCache, LayerCache
from .layers import (embed, experts, mlp, per_layer_branch, per_layer_inputs, proportional_rope_angles,
                     rope_angles, route, softcap)
from .params import LayerParams, Params, params_nbytes
from .recording import record, recording


def self_attention(x, p: LayerParams, c: GemmaConfig, ops: kernels.Backend, layer: int, rope, window,
                   kv: LayerCache, positions, keep=slice(None)):
    """Project to heads, (Gemma 3/4: QK-norm), rotate, cache, attend (over the last `window` positions, or all
    with None), project back. Every position's keys and values go to the cache; the queries of the positions
    `keep` (all, or the last: see forward) attend and come out.

    Gemma 4 also normalises V (no gain), and on some layers computes no K/V at all (KV sharing: it attends
    over what its source layer wrote into the cache in this pass) or takes V from the K projection
    (attention_k_eq_v). H, K, Dh are this layer's.

    Shapes: (T, D) -> (Tq, D), Tq = the positions kept
    """
    T, H, K, Dh = x.shape[0], c.num_attention_heads, c.layer_kv_heads(layer), c.layer_head_dim(layer)
    eps = c.rms_norm_eps
    # one call for the three products of x (a backend may make them in one pass); a projection the layer does
    # not have is None and gives None (Gemma 4: neither k_proj nor v_proj on KV-shared layers, no v_proj with
    # attention_k_eq_v)
    q, k, v = ops.linears(x, p.q_proj, p.k_proj, p.v_proj)
    q, q_positions = q[keep], positions[keep]  # the queries that go on
    Tq = q.shape[0]
    q = q.reshape(Tq, H, Dh).transpose(1, 0, 2)  # (Tq, H*Dh) -> (H, Tq, Dh)
    if c.qk_norm:  # Gemma 3/4 normalise every head before RoPE (transformers Gemma3Attention)
        q = ops.rms_norm(q, p.q_norm, eps)
    cos, sin = rope
    q = ops.apply_rope(q, cos[keep], sin[keep])
    if c.kv_shared(layer):  # Gemma 4: the keys and values its source layer wrote in this pass (kv is that cache)
        k, v, k_positions = kv.read(positions)
    else:
        k = k.reshape(T, K, Dh).transpose(1, 0, 2)  # (T, K*Dh) -> (K, T, Dh)
        # attention_k_eq_v (Gemma 4 global layers): V is the raw K projection, before k_norm and RoPE
        v = v.reshape(T, K, Dh).transpose(1, 0, 2) if c.has_v_proj(layer) else k
        if c.qk_norm:
            k = ops.rms_norm(k, p.k_norm, eps)
        if c.value_norm:  # Gemma 4: RMSNorm without a gain on each value head (the zero-centred gain 0)
            v = ops.rms_norm(v, np.zeros(Dh, np.float32), eps)
        k = ops.apply_rope(k, cos, sin)
        k, v, k_positions = kv.update(k, v, positions)  # (K, S, Dh) each: the cached positions and these
    record(layer, q=q, k=k, v=v, q_positions=q_positions, k_positions=k_positions, window=window,
           scale=c.attn_scale, softcap=c.attn_logit_softcapping)  # what the attention pattern is made of
    out = ops.attention(q, k, v, q_positions, k_positions, window, c.attn_scale,
                        c.attn_logit_softcapping)  # (H, Tq, Dh)
    return ops.linear(out.transpose(1, 0, 2).reshape(Tq, H * Dh), p.o_proj)  # -> (Tq, H*Dh) -> (Tq, D)


def mixture_of_experts(x, p: LayerParams, c: GemmaConfig, ops: kernels.Backend, layer: int):
    """Gemma 4's experts, beside the dense MLP: route each token to its top_k experts, run them on the
    pre-normed stream, normalise their weighted sum (transformers Gemma4TextDecoderLayer, enable_moe_block).

    Shapes: (T, D) -> (T, D)
    """
    eps = c.rms_norm_eps
    weights, chosen = route(x, p.router_scale, p.router_proj, p.expert_scale, c.top_k_experts, eps,
                            ops.linear, ops.rms_norm)  # (T, k) each
    record(layer, router_weights=weights, router_experts=chosen)
    h = experts(ops.rms_norm(x, p.pre_moe_norm, eps), weights, chosen, p.experts_gate_up, p.experts_down,
                ops.linear)
    return ops.rms_norm(h, p.post_moe_norm, eps)


def block(x, p: LayerParams, c: GemmaConfig, ops: kernels.Backend, layer: int, rope, window, kv: LayerCache,
          positions, layer_input=None, keep=slice(None)):
    """One transformer block: attention, then the MLP, each as a residual branch; on Gemma 4 E-series a third
    branch fed by this layer's `layer_input` (T, P). Past the attention only the positions `keep` go on (all,
    or the last: see forward). Shapes: (T, D) -> (Tq, D)"""
    eps = c.rms_norm_eps
    steps = {}  # each value by its name in recording.py, recorded once at the end
    steps["attn_norm"] = h = ops.rms_norm(x, p.input_norm, eps)
    steps["attn_out"] = h = self_attention(h, p, c, ops, layer, rope, window, kv, positions, keep)
    if c.sandwich_norms:  # Gemma 2/3/4 normalise the branch's output too
        steps["post_attn_norm"] = h = ops.rms_norm(h, p.post_attn_norm, eps)
    steps["resid_mid"] = x = x[keep] + h
    steps["mlp_norm"] = h = ops.rms_norm(x, p.pre_mlp_norm, eps)
    steps["mlp_out"] = h = mlp(h, p.gate_proj, p.up_proj, p.down_proj, ops.linear, ops.linears, ops.geglu)
    if c.enable_moe_block:  # Gemma 4 MoE: the dense MLP's output normed, plus the experts' (from x, not h)
        steps["moe_out"] = h = ops.rms_norm(h, p.post_dense_norm, eps) + mixture_of_experts(x, p, c, ops, layer)
    if c.sandwich_norms:
        steps["post_mlp_norm"] = h = ops.rms_norm(h, p.post_mlp_norm, eps)
    steps["resid"] = x = x + h
    if c.per_layer_embeddings:  # Gemma 4 E-series: the per-layer input's residual branch
        steps["per_layer_out"] = h = per_layer_branch(x, layer_input[keep], p.per_layer_gate, p.per_layer_proj,
                                                      p.post_per_layer_norm, eps, ops.linear, ops.rms_norm)
        steps["resid"] = x = x + h
    if p.layer_scalar is not None:  # Gemma 4 scales the whole stream leaving each block (not just the branches)
        steps["resid"] = x = x * p.layer_scalar
    record(layer, **steps)
    return x


def rope_table(positions, head_dim: int, r: Rope):
    """cos, sin for one layer type and head dim: plain or linearly scaled RoPE, or Gemma 4's proportional one
    where only some pairs rotate. Shapes: (T,) -> (T, Dh) x2"""
    if r.partial_rotary_factor != 1.0:
        return proportional_rope_angles(positions, head_dim, r.theta, r.factor, r.partial_rotary_factor)
    return rope_angles(positions, head_dim, r.theta, r.factor)


def forward(params: Params, c: GemmaConfig, token_ids, cache: KVCache, ops: kernels.Backend = kernels.NUMPY,
            last_only: bool = False) -> np.ndarray:
    """Run new tokens through the model, continuing from what `cache` holds.

    Returns float32 logits for every new position, or only the last one with `last_only` (all that sampling
    needs): that skips a (T, V) matmul, and the last layer's work past its keys and values for the other
    positions (their keys and values still go to the cache; nothing after that layer reads their rows, and
    llama.cpp's graphs drop them there too: inp_out_ids), unless a recording wants every row.
    Shapes: (T,) -> (T, V), or (1, V) with last_only
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
    if c.per_layer_embeddings and token_ids.max() >= c.vocab_size_per_layer_input:  # a smaller per-layer table
        raise InvalidArgument(f"token id {token_ids.max()} has no row in the per-layer embedding table "
                              f"(vocab_size_per_layer_input = {c.vocab_size_per_layer_input})")

    x = embed(token_ids, params.embed, c.embed_scale, ops.embedding_rows)  # (T, D)
    record(None, embed=x)  # recording (recording.py) costs nothing unless inside `with record_forward()`
    layer_inputs = [None] * c.num_hidden_layers
    if c.per_layer_embeddings:  # Gemma 4 E-series: every layer's own small input, (T, L, P)
        P = c.hidden_size_per_layer_input
        token_rows = embed(token_ids, params.embed_per_layer, P**0.5, ops.embedding_rows)  # (T, L*P)
        layer_inputs = per_layer_inputs(token_rows, x, params.per_layer_model_proj, params.per_layer_proj_norm,
                                        c.rms_norm_eps, c.num_hidden_layers, ops.linear, ops.rms_norm)
        record(None, per_layer_inputs=layer_inputs)
        layer_inputs = layer_inputs.transpose(1, 0, 2)  # (T, L, P) -> (L, T, P)
    # one cos/sin table per layer type (and head dim): Gemma 3 uses base 1e6 on global layers and 1e4 on
    # sliding ones; Gemma 4's global layers have their own head dim and proportional RoPE
    kinds = sorted(set(zip(c.layer_types, map(c.layer_head_dim, range(c.num_hidden_layers)))))
    ropes = {(t, dh): rope_table(positions, dh, c.rope[t]) for t, dh in kinds}
    shortcut = last_only and not recording()  # the last layer carries only the last row past its keys and values
    for i, p in enumerate(params.layers):
        # each layer's choices, made here: its RoPE table and window by its type (sliding or global), its cache
        rope = ropes[c.layer_types[i], c.layer_head_dim(i)]
        keep = slice(-1, None) if shortcut and i == c.num_hidden_layers - 1 else slice(None)  # rows going on
        x = block(x, p, c, ops, i, rope=rope, window=c.layer_window(i), kv=cache.layers[i], positions=positions,
                  layer_input=layer_inputs[i], keep=keep)
    # commit: the layers wrote past cache.length; an exception above left the cache as it was
    cache.length += len(token_ids)

    if last_only:
        x = x[-1:]  # (with the shortcut, the last block kept only that row already)
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
