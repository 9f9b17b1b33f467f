"""Training: the next-token loss of a batch and its gradient, by hand-written backward passes (as llm.c).

The interface the fine-tuning loop builds on:

    parameters(model, train) -> dict[str, np.ndarray]
        The trainable arrays, views into model.params (update them in place), keyed by name:
          train="lora": "layers.{i}.{field}.A" and ".B" for every LayerParams field holding a weights.LoRA
                        (the base weights stay frozen, in any storage type: int8/int4 bases are QLoRA)
          train="full": "embed", "final_norm", "layers.{i}.{field}" for every parameter; every matrix must
                        be a float32 ndarray (a quantized model is trained through LoRA). Gemma 4 adds
                        "embed_per_layer", "per_layer_model_proj", "per_layer_proj_norm" (E-series) and one
                        name per expert matrix, "layers.{i}.experts_gate_up.{e}"; its layer_scalar is frozen
                        (a buffer in transformers, not a parameter)

    loss_and_grads(model, tokens, labels, train="lora", checkpoint=False, dropout=0.0, rng=None)
        -> (loss_sum: float, count: int, grads: dict[str, np.ndarray])
        tokens (B, T) int, labels (B, T) int with -100 = no loss. As in transformers, the logits at position t
        predict labels[:, t + 1] (the shift is done here; labels[:, 0] is never a target). Returns the SUM of
        the counted tokens' negative log-likelihoods (nats), how many tokens were counted, and the gradients
        of that sum, keyed as parameters(). Divide both by the total count of all micro-batches of a step:
        that is transformers' mean over every unmasked token (gradient accumulation included).
        checkpoint=True keeps only each block's input and recomputes the block in the backward (less memory,
        one more forward of the blocks). Measured on the built-in model (int8 base weights, Numba backend,
        rank-8 LoRA on all seven projections, a batch of 8 x 256 tokens): peak RSS 1.2 GB with checkpointing,
        2.7 GB without (each block's record holds ~100 MB at that size). dropout > 0 drops the input of every LoRA branch as PEFT does, with masks drawn
        from `rng` (an np.random.Generator: same generator state, same gradients).

    loss(model, tokens, labels) -> (loss_sum, count)
        The same sum and count, forward only (evaluation).

How a step runs (no KV cache: every sequence of the batch starts at position 0, and the B sequences go through
each block together as N = B*T rows, so every product is one big matrix product):

    embed -> block_forward x L (each keeps a BlockRecord, or only its input with checkpoint=True)
          -> final norm -> cross_entropy (the tied head and the loss together, a block of positions at a time)
          <- rms_norm_backward <- block_backward x L (in reverse) <- embed_backward (full fine-tuning only)

Gemma 4 adds two paths between layers besides the residual stream (docs/training.md): the per-layer inputs
(E-series), made from the embedding before the first block and read by every block, whose gradients are
gathered in the Batch and sent back by per_layer_inputs_backward after the last block's backward; and KV
sharing, where a later layer attends over an earlier layer's K and V and hands their gradient back to it.

The (N, V) logits never exist whole: V = 262,144 for Gemma 3, so 2,048 positions would be 2.1 GB of float32.
cross_entropy makes the logits of a block of positions, takes their loss and their gradient at once, sends that
back through the head, and drops them; only positions that have a target get logits at all.

Each part's backward is in layers.py, right after its forward. This module composes them and keeps what the
forward passed on, one record per block (llm.c's activation struct).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .errors import InvalidArgument
from .layers import (apply_rope, apply_rope_backward, attention_backward, attention_mask, attention_probs, embed,
                     embed_backward, experts, experts_backward, gelu_tanh, lora_update,
                     lora_update_backward, mlp_backward, per_layer_branch, per_layer_branch_backward, per_layer_inputs,
                     per_layer_inputs_backward, rms_norm_backward, route, route_backward, softcap, softcap_backward)
from .model import rope_table
from .params import LayerParams, Params
from .weights import LoRA

IGNORE = -100  # a label that is not a target (transformers' ignore_index)
LOGITS_BYTES = 1 << 28  # float32 logits made at once: 256 MiB, 256 positions of Gemma 3's 262,144-word vocabulary
TRAIN_CHOICES = ("lora", "full")


# ---- what can be trained --------------------------------------------------------------------------------------

FROZEN = ("layer_scalar",)  # Gemma 4's layer_scalar is a buffer in transformers, not a parameter: never trained


def layer_fields(p: LayerParams) -> list[str]:
    """The fields of a block that hold a parameter in this model (Gemma 1 has no sandwich or QK norms)."""
    return [f.name for f in fields(LayerParams) if getattr(p, f.name) is not None and f.name not in FROZEN]


def model_fields(params: Params) -> list[str]:
    """The model-level parameters: the embedding (also the head), the final norm, and Gemma 4's per-layer
    embedding table, projection and norm (E-series)."""
    return [f.name for f in fields(Params) if f.name != "layers" and getattr(params, f.name) is not None]


def parameters(model, train: str) -> dict[str, np.ndarray]:
    """The trainable arrays of `model`, views into model.params, keyed by name (see the module docstring)."""
    params = model.params
    out = {}
    if train == "lora":
        for i, p in enumerate(params.layers):
            for name in layer_fields(p):
                w = getattr(p, name)
                if isinstance(w, LoRA):
                    out[f"layers.{i}.{name}.A"], out[f"layers.{i}.{name}.B"] = w.A, w.B
        if not out:
            raise InvalidArgument("train='lora': the model has no LoRA adapters (weights.LoRA) to train; add "
                                  "adapters first, or use train='full' on a float32 model")
        return out
    if train != "full":
        raise InvalidArgument(f"train={train!r}: expected one of {', '.join(TRAIN_CHOICES)}")
    out = {name: getattr(params, name) for name in model_fields(params)}
    for i, p in enumerate(params.layers):
        for name in layer_fields(p):
            w = getattr(p, name)
            if isinstance(w, list):  # Gemma 4's experts: one matrix each, "layers.{i}.experts_down.{e}"
                out.update({f"layers.{i}.{name}.{e}": m for e, m in enumerate(w)})
            else:
                out[f"layers.{i}.{name}"] = w
    for name, w in out.items():
        if not (isinstance(w, np.ndarray) and w.dtype in (np.float32, np.float64)):
            kind = type(w).__name__ if not isinstance(w, np.ndarray) else str(w.dtype)
            raise InvalidArgument(f"train='full' needs float32 weights, but {name} is {kind}: load the model "
                                  "without quantize/dtype, or train LoRA adapters on it")
    return out


def _slots(model, grads: dict[str, np.ndarray]) -> Params:
    """Where each parameter's gradient goes, shaped like the parameters (a Params of gradients).

    A field holds an array (full fine-tuning), the pair (dA, dB) of a LoRA weight, a list of E arrays (Gemma 4's
    experts), or None (frozen), which is exactly what the `dw` argument of the layers' backward functions takes."""
    layers_ = []
    for i, p in enumerate(model.params.layers):
        slot = {}
        for f in fields(LayerParams):
            key = f"layers.{i}.{f.name}"
            if key + ".A" in grads:
                slot[f.name] = (grads[key + ".A"], grads[key + ".B"])
            elif isinstance(getattr(p, f.name), list) and key + ".0" in grads:
                slot[f.name] = [grads[f"{key}.{e}"] for e in range(len(getattr(p, f.name)))]
            else:
                slot[f.name] = grads.get(key)
        layers_.append(LayerParams(**slot))
    top = {f.name: grads.get(f.name) for f in fields(Params) if f.name != "layers"}
    return Params(layers=layers_, **top)


# ---- one batch, shared by all blocks --------------------------------------------------------------------------

class LoRADropout:
    """PEFT's lora_dropout: each LoRA branch sees its input with elements zeroed with probability p and the rest
    scaled by 1 / (1 - p) (torch.nn.Dropout); the frozen base sees the input as it is:
        y = x W^T + s (dropout(x) A^T) B^T                        (peft/tuners/lora/layer.py, Linear.forward)
    The masks are not stored: each is drawn again from (this batch's seed, the weight's number), so the
    backward, and a block recomputed under checkpointing, use exactly the forward's mask."""

    def __init__(self, p: float, seed: int, model):
        self.p = p
        self.seed = seed
        lora = [w for layer in model.params.layers for w in vars(layer).values() if isinstance(w, LoRA)]
        self.number = {id(w): n for n, w in enumerate(lora)}  # a stable number for each LoRA weight

    def mask(self, w: LoRA, shape) -> np.ndarray:
        """Shapes: -> (N, in) float32: 0 or 1 / (1 - p)"""
        rng = np.random.default_rng([self.seed, self.number[id(w)]])
        return (rng.random(shape, dtype=np.float32) >= self.p) * np.float32(1.0 / (1.0 - self.p))


@dataclass
class Batch:
    """What every block of one batch shares: the model's config and backend, the shapes, RoPE tables and masks;
    on Gemma 4 also what crosses between blocks besides the residual stream (per-layer inputs, shared K/V)."""

    config: object
    ops: object  # the model's backend (kernels.Backend): its linear and rms_norm run the forward's products
    B: int  # sequences
    T: int  # positions per sequence
    ropes: dict  # (layer type, head dim) -> (cos, sin), each (T, Dh)
    masks: dict  # window (None: global layer) -> (T, T) bool
    dropout: LoRADropout | None = None
    # ---- Gemma 4 ----
    layer_inputs: np.ndarray | None = None  # (L, N, P)  E-series: each layer's per-layer input
    dlayer_inputs: np.ndarray | None = None  # (L, N, P)  and its gradient, filled by each block's backward
    kv: dict = field(default_factory=dict)  # source layer -> (k, v) after RoPE and norms, for KV-shared layers
    dkv: dict = field(default_factory=dict)  # source layer -> (dk, dv) summed over the layers sharing its K/V

    def linear(self, x, w):
        """ops.linear(x, w), with the LoRA branch's input dropped in training. Shapes: (N, in) -> (N, out)"""
        if self.dropout is None or not isinstance(w, LoRA):
            return self.ops.linear(x, w)
        return self.ops.linear(x, w.base) + lora_update(x * self.dropout.mask(w, x.shape), w)

    def linear_backward(self, dout, x, w, dw=None):
        """ops.linear_backward, through the same dropout mask as the forward. Shapes: (N, out) -> (N, in)"""
        if self.dropout is None or not isinstance(w, LoRA):
            return self.ops.linear_backward(dout, x, w, dw)
        keep = self.dropout.mask(w, x.shape)
        dx = self.ops.linear_backward(dout, x, w.base)
        return dx + keep * lora_update_backward(dout, x * keep, w, *(dw if dw is not None else (None, None)))


# ---- one block ------------------------------------------------------------------------------------------------

@dataclass
class BlockRecord:
    """What one block's forward keeps for its backward (llm.c's activation tensors). N = B*T rows; K and Dh are
    this layer's.

    With checkpointing only `x` is kept between the passes and the rest is recomputed from it in the backward."""

    x: np.ndarray  # (N, D)           the block's input
    attn_in: np.ndarray  # (N, D)     input_norm(x): the input of q, k, v
    q_raw: np.ndarray | None  # (B, H, T, Dh)  Gemma 3/4: q before QK-norm (the norm's backward needs it)
    k_raw: np.ndarray | None  # (B, K, T, Dh)  (None on Gemma 4's KV-shared layers)
    q: np.ndarray  # (B, H, T, Dh)    after RoPE
    k: np.ndarray  # (B, K, T, Dh)    after RoPE (a KV-shared layer's: its source's)
    v: np.ndarray  # (B, K, T, Dh)
    probs: np.ndarray  # (B, H, T, T) attention weights
    attn: np.ndarray  # (N, H*Dh)     the heads' outputs side by side: the input of o_proj
    o: np.ndarray  # (N, D)           o_proj's output (the input of post_attn_norm on Gemma 2/3/4)
    mid: np.ndarray  # (N, D)         the residual stream between attention and MLP
    mlp_in: np.ndarray  # (N, D)      pre_mlp_norm(mid): the input of gate and up
    g: np.ndarray  # (N, F)           gate(mlp_in), before GELU
    u: np.ndarray  # (N, F)           up(mlp_in)
    m: np.ndarray  # (N, D)           the MLP's output (the input of post_mlp_norm, of post_dense_norm with MoE)
    # ---- Gemma 4, each only where its config field says so ----
    v_raw: np.ndarray | None = None  # (B, K, T, Dh)  V before the value norm (on K=V layers: k_raw)
    router_weights: np.ndarray | None = None  # (N, k)  MoE: each token's experts and their weights
    router_experts: np.ndarray | None = None  # (N, k) int
    moe_in: np.ndarray | None = None  # (N, D)   pre_moe_norm(mid): the experts' input
    moe: np.ndarray | None = None  # (N, D)      the experts' output (the input of post_moe_norm)
    ffn: np.ndarray | None = None  # (N, D)      dense + experts, normed: the input of post_mlp_norm
    resid: np.ndarray | None = None  # (N, D)    E-series: the stream entering the per-layer branch


def block_forward(x: np.ndarray, p: LayerParams, layer: int, batch: Batch) -> tuple[np.ndarray, BlockRecord]:
    """One block, as model.block computes it, for B sequences at once, keeping what the backward needs.

    Shapes: (N, D) -> (N, D), N = B*T
    """
    c, ops, B, T = batch.config, batch.ops, batch.B, batch.T
    H, K, Dh, eps = c.num_attention_heads, c.layer_kv_heads(layer), c.layer_head_dim(layer), c.rms_norm_eps
    cos, sin = batch.ropes[c.layer_types[layer], Dh]
    mask = batch.masks[c.layer_window(layer)]

    attn_in = ops.rms_norm(x, p.input_norm, eps)
    q = batch.linear(attn_in, p.q_proj).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (N, H*Dh) -> (B, H, T, Dh)
    q_raw = k_raw = v_raw = None
    if c.qk_norm:  # Gemma 3/4
        q_raw, q = q, ops.rms_norm(q, p.q_norm, eps)
    q = apply_rope(q, cos, sin)  # the reference on (B, H, T, Dh): the backend's twin takes one sequence (H, T, Dh)
    if c.kv_shared(layer):  # Gemma 4: the keys and values its source layer made in this pass
        k, v = batch.kv[c.kv_source(layer)]
    else:
        k = batch.linear(attn_in, p.k_proj).reshape(B, T, K, Dh).transpose(0, 2, 1, 3)  # (N, K*Dh) -> (B, K, T, Dh)
        # attention_k_eq_v (Gemma 4 global layers): V is the raw K projection
        v = batch.linear(attn_in, p.v_proj).reshape(B, T, K, Dh).transpose(0, 2, 1, 3) if c.has_v_proj(layer) else k
        if c.qk_norm:
            k_raw, k = k, ops.rms_norm(k, p.k_norm, eps)
        if c.value_norm:  # Gemma 4: no gain
            v_raw, v = v, ops.rms_norm(v, np.zeros(Dh, np.float32), eps)
        k = apply_rope(k, cos, sin)
        if any(c.kv_source(j) == layer for j in range(layer + 1, c.num_hidden_layers)):
            batch.kv[layer] = k, v  # Gemma 4: later layers attend over these (and need them when recomputed)
    probs = np.stack([attention_probs(q[b], k[b], mask, c.attn_scale, c.attn_logit_softcapping)
                      for b in range(B)])  # (B, H, T, T)
    G = H // K
    attn = (probs.reshape(B, K, G * T, T) @ v).reshape(B, H, T, Dh)  # the G heads sharing a kv head, stacked
    attn = attn.transpose(0, 2, 1, 3).reshape(B * T, H * Dh)  # (B, H, T, Dh) -> (N, H*Dh)
    o = batch.linear(attn, p.o_proj)
    mid = x + (ops.rms_norm(o, p.post_attn_norm, eps) if c.sandwich_norms else o)

    mlp_in = ops.rms_norm(mid, p.pre_mlp_norm, eps)
    g, u = batch.linear(mlp_in, p.gate_proj), batch.linear(mlp_in, p.up_proj)  # (N, F) each
    m = batch.linear(gelu_tanh(g) * u, p.down_proj)  # layers.mlp, keeping g and u
    r = BlockRecord(x, attn_in, q_raw, k_raw, q, k, v, probs, attn, o, mid, mlp_in, g, u, m, v_raw=v_raw)
    h = m
    if c.enable_moe_block:  # Gemma 4 MoE (model.mixture_of_experts): experts on the stream beside the MLP
        r.router_weights, r.router_experts = route(mid, p.router_scale, p.router_proj, p.expert_scale,
                                                   c.top_k_experts, eps, ops.linear, ops.rms_norm)
        r.moe_in = ops.rms_norm(mid, p.pre_moe_norm, eps)
        r.moe = experts(r.moe_in, r.router_weights, r.router_experts, p.experts_gate_up, p.experts_down,
                        ops.linear)
        r.ffn = h = ops.rms_norm(m, p.post_dense_norm, eps) + ops.rms_norm(r.moe, p.post_moe_norm, eps)
    out = mid + (ops.rms_norm(h, p.post_mlp_norm, eps) if c.sandwich_norms else h)
    if c.per_layer_embeddings:  # Gemma 4 E-series: the per-layer input's branch
        r.resid = out
        out = out + per_layer_branch(out, batch.layer_inputs[layer], p.per_layer_gate, p.per_layer_proj,
                                     p.post_per_layer_norm, eps, batch.linear, ops.rms_norm)
    if p.layer_scalar is not None:  # Gemma 4: the whole stream leaving the block
        out = out * p.layer_scalar
    return out, r


def block_backward(dout: np.ndarray, r: BlockRecord, p: LayerParams, grads: LayerParams, layer: int,
                   batch: Batch) -> np.ndarray:
    """The gradient of block_forward, its steps in reverse. `grads` holds, per field, where that parameter's
    gradient is added (an array, a LoRA pair (dA, dB), a list of E arrays for experts, or None for frozen): see
    _slots. A Gemma 4 block also adds into `batch`: its per-layer input's gradient, and on a KV-shared layer the
    gradient of its source layer's K and V, which that layer's backward (visited later) takes.

    Shapes: dout (N, D) -> dx (N, D)
    """
    c, B, T = batch.config, batch.B, batch.T
    H, K, Dh, eps = c.num_attention_heads, c.layer_kv_heads(layer), c.layer_head_dim(layer), c.rms_norm_eps
    cos, sin = batch.ropes[c.layer_types[layer], Dh]
    mask = batch.masks[c.layer_window(layer)]

    if p.layer_scalar is not None:  # a frozen buffer, but its factor is in the chain rule
        dout = dout * p.layer_scalar
    if c.per_layer_embeddings:  # out = resid + per_layer_branch(resid, layer_input)
        dresid, batch.dlayer_inputs[layer] = per_layer_branch_backward(
            dout, r.resid, batch.layer_inputs[layer], p.per_layer_gate, p.per_layer_proj, p.post_per_layer_norm,
            eps, grads.per_layer_gate, grads.per_layer_proj, grads.post_per_layer_norm, batch.linear,
            batch.linear_backward)
        dout = dout + dresid

    # MLP branch: out = mid + post_mlp_norm(mlp(pre_mlp_norm(mid)))
    dm = rms_norm_backward(dout, r.m if r.ffn is None else r.ffn, p.post_mlp_norm, eps,
                           grads.post_mlp_norm) if c.sandwich_norms else dout
    dmid = dout
    if c.enable_moe_block:  # ffn = post_dense_norm(m) + post_moe_norm(experts(pre_moe_norm(mid), route(mid)))
        dmoe = rms_norm_backward(dm, r.moe, p.post_moe_norm, eps, grads.post_moe_norm)
        dmoe_in, dweights = experts_backward(dmoe, r.moe_in, r.router_weights, r.router_experts, p.experts_gate_up,
                                             p.experts_down, grads.experts_gate_up, grads.experts_down,
                                             batch.ops.linear, batch.ops.linear_backward)
        dmid = dmid + rms_norm_backward(dmoe_in, r.mid, p.pre_moe_norm, eps, grads.pre_moe_norm)
        dmid = dmid + route_backward(dweights, r.mid, p.router_scale, p.router_proj, p.expert_scale, r.router_experts,
                                     eps, grads.router_scale, grads.router_proj, grads.expert_scale, batch.ops.linear,
                                     batch.ops.linear_backward)
        dm = rms_norm_backward(dm, r.m, p.post_dense_norm, eps, grads.post_dense_norm)
    dmlp_in = mlp_backward(dm, r.mlp_in, p.gate_proj, p.up_proj, p.down_proj, r.g, r.u, grads.gate_proj,
                           grads.up_proj, grads.down_proj, linear_backward=batch.linear_backward)
    dmid = dmid + rms_norm_backward(dmlp_in, r.mid, p.pre_mlp_norm, eps, grads.pre_mlp_norm)

    # attention branch: mid = x + post_attn_norm(o_proj(attention(rope(q), rope(k), v)))
    do = rms_norm_backward(dmid, r.o, p.post_attn_norm, eps, grads.post_attn_norm) if c.sandwich_norms else dmid
    dattn = batch.linear_backward(do, r.attn, p.o_proj, grads.o_proj)
    dattn = dattn.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (N, H*Dh) -> (B, H, T, Dh)
    dq, dk, dv = np.empty_like(r.q), np.empty_like(r.k), np.empty_like(r.v)
    for b in range(B):
        dq[b], dk[b], dv[b] = attention_backward(dattn[b], r.q[b], r.k[b], r.v[b], mask, c.attn_scale,
                                                 c.attn_logit_softcapping, r.probs[b])
    dq = apply_rope_backward(dq, cos, sin)
    if c.qk_norm:
        dq = rms_norm_backward(dq, r.q_raw, p.q_norm, eps, grads.q_norm)
    dq = dq.transpose(0, 2, 1, 3).reshape(B * T, H * Dh)  # (B, H, T, Dh) -> (N, H*Dh)
    dattn_in = batch.linear_backward(dq, r.attn_in, p.q_proj, grads.q_proj)
    if c.kv_shared(layer):  # K and V are the source layer's: their gradient goes back there
        source = c.kv_source(layer)
        if source in batch.dkv:
            dk, dv = dk + batch.dkv[source][0], dv + batch.dkv[source][1]
        batch.dkv[source] = dk, dv
        return dmid + rms_norm_backward(dattn_in, r.x, p.input_norm, eps, grads.input_norm)
    if layer in batch.dkv:  # the layers that attended over this one's K and V (all later: already visited)
        dk_shared, dv_shared = batch.dkv.pop(layer)
        dk, dv = dk + dk_shared, dv + dv_shared
    dk = apply_rope_backward(dk, cos, sin)
    if c.qk_norm:
        dk = rms_norm_backward(dk, r.k_raw, p.k_norm, eps, grads.k_norm)
    if c.value_norm:
        dv = rms_norm_backward(dv, r.v_raw, np.zeros(Dh, np.float32), eps)
    if not c.has_v_proj(layer):  # K=V: V's gradient flows into the raw K projection, beside K's
        dk, dv = dk + dv, None
    dk = dk.transpose(0, 2, 1, 3).reshape(B * T, K * Dh)  # (B, K, T, Dh) -> (N, K*Dh)
    dattn_in = dattn_in + batch.linear_backward(dk, r.attn_in, p.k_proj, grads.k_proj)
    if dv is not None:
        dv = dv.transpose(0, 2, 1, 3).reshape(B * T, K * Dh)
        dattn_in = dattn_in + batch.linear_backward(dv, r.attn_in, p.v_proj, grads.v_proj)
    return dmid + rms_norm_backward(dattn_in, r.x, p.input_norm, eps, grads.input_norm)


# ---- the head and the loss ------------------------------------------------------------------------------------

def cross_entropy(h: np.ndarray, table, targets: np.ndarray, cap: float | None, ops, grad: bool = True,
                  dtable: np.ndarray | None = None, chunk: int | None = None):
    """Sum of -log softmax(softcap(h E^T))[target] over positions, and its gradient, through the tied head E.

    A block of `chunk` positions at a time (LOGITS_BYTES of float32 logits by default): cross_entropy_block
    makes the block's logits, its loss and gradient, and sends that back through the head before the next
    block's logits exist, so (M, V) never does. The sum is accumulated in float64.

    Shapes: h (M, D), table (V, D), targets (M,) -> loss float, dh (M, D) (None unless grad)
    """
    step = chunk or max(1, LOGITS_BYTES // (4 * table.shape[0]))
    total = 0.0
    dh = np.empty_like(h) if grad else None
    for start in range(0, len(targets), step):
        block = slice(start, start + step)
        loss_sum, dh_block = cross_entropy_block(h[block], table, targets[block], cap, ops, grad, dtable)
        total += loss_sum
        if grad:
            dh[block] = dh_block
    return total, dh


def cross_entropy_block(h: np.ndarray, table, targets: np.ndarray, cap: float | None, ops, grad: bool,
                        dtable: np.ndarray | None):
    """The loss of a block of positions and, in the same (n, V) array, its gradient:
        loss = logsumexp(z) - z[target],   dz = softmax(z) - onehot(target)
    then back through the final soft-cap (Gemma 2) and the head (linear_backward: dh = dz E, and dE += dz^T h
    when the embedding is trained). The logits are freed when this returns.

    Shapes: h (n, D), table (V, D), targets (n,) -> float, dh (n, D) or None
    """
    rows = np.arange(len(targets))
    z = ops.linear(h, table)  # (n, V)
    logits = softcap(z, cap)  # z itself when there is no cap: the steps below then overwrite z, unused
    top = logits.max(axis=-1, keepdims=True)
    chosen = logits[rows, targets] - top[:, 0]
    e = np.exp(np.subtract(logits, top, out=logits), out=logits)  # in place: one (n, V) array, not two
    sums = e.sum(axis=-1, keepdims=True)
    loss_sum = float(np.sum(np.log(sums[:, 0]) - chosen, dtype=np.float64))
    if not grad:
        return loss_sum, None
    dz = np.divide(e, sums, out=e)  # softmax
    dz[rows, targets] -= 1
    return loss_sum, ops.linear_backward(softcap_backward(dz, z, cap), h, table, dtable)


# ---- the whole model ------------------------------------------------------------------------------------------

def _check(model, tokens, labels):
    """tokens and labels as (B, T) int64 arrays, or an error naming what is wrong."""
    c = model.config
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise InvalidArgument(f"tokens must be a (batch, length) array of token ids, got shape {tokens.shape}")
    if labels.shape != tokens.shape:
        raise InvalidArgument(f"labels must have the shape of tokens {tokens.shape}, got {labels.shape}")
    if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
        raise InvalidArgument(f"tokens and labels must be integers, got {tokens.dtype} and {labels.dtype}")
    if tokens.min() < 0 or tokens.max() >= c.vocab_size:
        raise InvalidArgument(f"token ids must be in [0, {c.vocab_size}), got {tokens.min()}..{tokens.max()}")
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= c.vocab_size))
    if bad.any():
        raise InvalidArgument(f"labels must be {IGNORE} (no loss) or token ids in [0, {c.vocab_size}), got "
                              f"{labels[bad][0]}")
    if tokens.shape[1] > c.max_position_embeddings:
        raise InvalidArgument(f"sequences of {tokens.shape[1]} tokens are longer than the context window "
                              f"({c.max_position_embeddings})")
    return tokens.astype(np.int64), labels.astype(np.int64)


def _run(model, tokens, labels, slots=None, checkpoint=False, dropout=None, chunk=None):
    """The forward, the loss, and (given `slots`, from _slots) the backward, adding each gradient into its
    slot. Returns (loss_sum, count)."""
    c, ops, params = model.config, model.backend, model.params
    tokens, labels = _check(model, tokens, labels)
    B, T = tokens.shape
    positions = np.arange(T)
    kinds = {(c.layer_types[i], c.layer_head_dim(i)) for i in range(c.num_hidden_layers)}  # as model.forward
    batch = Batch(c, ops, B, T,
                  ropes={(t, dh): rope_table(positions, dh, c.rope[t]) for t, dh in kinds},
                  masks={c.layer_window(i): attention_mask(positions, positions, c.layer_window(i))
                         for i in range(c.num_hidden_layers)},
                  dropout=dropout)
    targets = np.full((B, T), IGNORE, np.int64)
    targets[:, :-1] = labels[:, 1:]  # the shift: position t predicts token t + 1
    targets = targets.reshape(-1)
    counted = np.flatnonzero(targets != IGNORE)  # only these positions get logits

    ids = tokens.reshape(-1)  # (N,), the sequences one after another
    x = embed(ids, params.embed, c.embed_scale, ops.embedding_rows)  # (N, D)
    if c.per_layer_embeddings:  # Gemma 4 E-series: each layer's input, from the token and from x
        L, P = c.num_hidden_layers, c.hidden_size_per_layer_input
        token_rows = embed(ids, params.embed_per_layer, P**0.5, ops.embedding_rows)  # (N, L*P)
        layer_inputs = per_layer_inputs(token_rows, x, params.per_layer_model_proj, params.per_layer_proj_norm,
                                        c.rms_norm_eps, L, ops.linear, ops.rms_norm)  # (N, L, P)
        batch.layer_inputs = layer_inputs.transpose(1, 0, 2)  # (N, L, P) -> (L, N, P): a slice per block
        if slots is not None:
            batch.dlayer_inputs = np.zeros_like(batch.layer_inputs)
    x_embed = x  # the per-layer inputs' backward needs it
    kept = []
    for i, p in enumerate(params.layers):
        x_next, record = block_forward(x, p, i, batch)
        if slots is not None:
            kept.append(x if checkpoint else record)
        x = x_next
    h = ops.rms_norm(x, params.final_norm, c.rms_norm_eps)
    dtable, dfinal = (slots.embed, slots.final_norm) if slots is not None else (None, None)
    total, dh_counted = cross_entropy(h[counted], params.embed, targets[counted], c.final_logit_softcapping, ops,
                                      grad=slots is not None, dtable=dtable, chunk=chunk)
    if slots is None:
        return total, len(counted)

    dh = np.zeros_like(h)
    dh[counted] = dh_counted
    dx = rms_norm_backward(dh, x, params.final_norm, c.rms_norm_eps, dfinal)
    for i in reversed(range(len(params.layers))):
        p = params.layers[i]
        record = block_forward(kept[i], p, i, batch)[1] if checkpoint else kept[i]
        kept[i] = None  # free this block's activations as soon as they are used
        dx = block_backward(dx, record, p, slots.layers[i], i, batch)
    if c.per_layer_embeddings and any(g is not None for g in (
            dtable, slots.embed_per_layer, slots.per_layer_model_proj, slots.per_layer_proj_norm)):
        # the per-layer inputs' gradient: into their table, their projection and norm, and the embedding
        dtoken_rows, dx_embed = per_layer_inputs_backward(
            batch.dlayer_inputs.transpose(1, 0, 2), token_rows, x_embed, params.per_layer_model_proj,
            params.per_layer_proj_norm, c.rms_norm_eps, L, slots.per_layer_model_proj, slots.per_layer_proj_norm,
            ops.linear, ops.linear_backward)  # (L, N, P) -> (N, L, P)
        dx = dx + dx_embed  # the embedding's second gradient, beside the first block's
        if slots.embed_per_layer is not None:
            dtoken_rows[ids == c.pad_token_id] = 0  # its <pad> row gets no gradient either (padding_idx)
            embed_backward(dtoken_rows, ids, P**0.5, slots.embed_per_layer)
    if dtable is not None:
        # as transformers: its nn.Embedding(padding_idx=pad_token_id) gives the <pad> row no gradient from its
        # use as an input (the row still learns as an output, through the tied head)
        dx[ids == c.pad_token_id] = 0
    embed_backward(dx, ids, c.embed_scale, dtable)
    return total, len(counted)


def loss_and_grads(model, tokens, labels, train: str = "lora", checkpoint: bool = False, dropout: float = 0.0,
                   rng: np.random.Generator | None = None, chunk: int | None = None):
    """(sum of the token losses, number of counted tokens, gradients of the sum keyed as parameters()).

    See the module docstring. `chunk` is how many positions get logits at once (default: LOGITS_BYTES' worth).
    """
    trainable = parameters(model, train)
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgument(f"dropout={dropout}: expected a probability in [0, 1)")
    drop = None
    if dropout > 0:
        if train != "lora":
            raise InvalidArgument("dropout applies to LoRA adapters; train='full' has none")
        if rng is None:
            raise InvalidArgument("dropout > 0 needs rng, a seeded np.random.Generator")
        drop = LoRADropout(dropout, int(rng.integers(2**63)), model)
    grads = {name: np.zeros_like(a) for name, a in trainable.items()}
    total, count = _run(model, tokens, labels, _slots(model, grads), checkpoint, drop, chunk)
    return total, count, grads


def loss(model, tokens, labels, chunk: int | None = None) -> tuple[float, int]:
    """(sum of the token losses, number of counted tokens), forward only. Shapes: (B, T), (B, T)"""
    return _run(model, tokens, labels, chunk=chunk)
