"""The model's parameters as plain data, and the one table that names every tensor.

The dataclasses mirror the call tree (Params -> layers -> LayerParams). The table `LAYER_TENSORS` is the
single place that says which tensor of a Hugging Face checkpoint or of a GGUF file fills which field, what
shape it must have, and on which Gemma versions (and which layers) it exists. Both loaders read it; neither
hard-codes a name. A layer's shapes and tensors are functions of (config, layer): Gemma 4's global layers
have their own head dim and kv-head count, its KV-shared layers no K/V projections.

Norm gains (every field named `*_norm`) are held zero-centred, the norm multiplying by (1 + w), whatever the
file holds: Gemma 1-3 checkpoints store w as it is; Gemma 4 checkpoints and every GGUF file store the full
multiplier, so loading subtracts 1 (build_params; GemmaConfig.norm_gain_is_w says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import numpy as np

from .errors import ModelFileError
from .weights import Float16Bits, StoredTensor, nbytes, storage_for, to_weight

if TYPE_CHECKING:  # only for annotations: config.py counts parameters from the table below (num_parameters)
    from .config import GemmaConfig


@dataclass
class LayerParams:
    """One transformer block. Norm weights are zero-centred: the norm multiplies by (1 + w).

    Matrices are float32 ndarrays in the reference, or any weight type of weights.py; norms are float32.
    Dh and K are this layer's (GemmaConfig.layer_head_dim / layer_kv_heads), F its MLP width."""

    input_norm: np.ndarray  # (D,)         before attention
    q_proj: np.ndarray  # (H*Dh, D)
    o_proj: np.ndarray  # (D, H*Dh)
    k_proj: np.ndarray | None = None  # (K*Dh, D)   None on Gemma 4's KV-shared layers
    v_proj: np.ndarray | None = None  # (K*Dh, D)   None there too, and on attention_k_eq_v global layers
    pre_mlp_norm: np.ndarray | None = None  # (D,)       before the MLP
    gate_proj: np.ndarray | None = None  # (F, D)
    up_proj: np.ndarray | None = None  # (F, D)
    down_proj: np.ndarray | None = None  # (D, F)
    post_attn_norm: np.ndarray | None = None  # (D,)   Gemma 2/3/4: on the attention output
    post_mlp_norm: np.ndarray | None = None  # (D,)    Gemma 2/3/4: on the MLP output
    q_norm: np.ndarray | None = None  # (Dh,)          Gemma 3/4: on each query head
    k_norm: np.ndarray | None = None  # (Dh,)          Gemma 3/4: on each key head
    # ---- Gemma 4 ----
    layer_scalar: np.ndarray | None = None  # (1,)     multiplies the block's output
    per_layer_gate: np.ndarray | None = None  # (P, D)   per-layer embeddings: gate of the third branch
    per_layer_proj: np.ndarray | None = None  # (D, P)   and its projection back
    post_per_layer_norm: np.ndarray | None = None  # (D,)  and its norm
    router_scale: np.ndarray | None = None  # (D,)     MoE: the router's input scale
    router_proj: np.ndarray | None = None  # (E, D)    the router's logits
    expert_scale: np.ndarray | None = None  # (E,)     a scale per expert on its routing weight
    experts_gate_up: list | None = None  # E x (2I, D)  each expert's gate and up projections, stacked
    experts_down: list | None = None  # E x (D, I)
    pre_moe_norm: np.ndarray | None = None  # (D,)     before the experts
    post_dense_norm: np.ndarray | None = None  # (D,)  on the dense MLP's output, in an MoE block
    post_moe_norm: np.ndarray | None = None  # (D,)    on the experts' output


@dataclass
class Params:
    embed: np.ndarray  # (V, D)   token embedding, also the (tied) output head
    final_norm: np.ndarray  # (D,)
    layers: list[LayerParams]
    # ---- Gemma 4 per-layer embeddings (L layers of width P, packed side by side) ----
    embed_per_layer: np.ndarray | None = None  # (V_ple, L*P)  a token's per-layer inputs, all layers at once
    per_layer_model_proj: np.ndarray | None = None  # (L*P, D)  and their part computed from the embedding
    per_layer_proj_norm: np.ndarray | None = None  # (P,)


@dataclass(frozen=True)
class TensorSpec:
    field: str  # LayerParams / Params field
    hf: str  # name in a Hugging Face checkpoint (per layer: under "model.layers.{i}.")
    gguf: str  # name in a GGUF file written by llama.cpp's converter (per layer: under "blk.{i}.")
    shape: Callable  # (config) -> shape for MODEL_TENSORS; (config, layer) -> shape for LAYER_TENSORS
    when: Callable = lambda c, i=None: True  # (config[, layer]) -> whether the tensor exists
    stacked: bool = False  # (E, out, in): one matrix per expert, loaded as a list of E matrices


def _gemma1(c, i):
    return c.model_type == "gemma"


def _pre_ffw(c, i):  # every version after Gemma 1 names its pre-MLP norm pre_feedforward_layernorm
    return c.model_type != "gemma"


def _sandwich(c, i):
    return c.sandwich_norms


def _qk_norm(c, i):
    return c.qk_norm


def _own_kv(c, i):  # Gemma 4's KV-shared layers have no K/V projections or k_norm (nor do their files)
    return not c.kv_shared(i)


def _own_v(c, i):  # ... and attention_k_eq_v global layers no v_proj
    return not c.kv_shared(i) and c.has_v_proj(i)


def _gemma4(c, i=None):
    return c.model_type == "gemma4_text"


def _ple(c, i=None):
    return c.per_layer_embeddings


def _moe(c, i):
    return c.enable_moe_block


D = lambda c, i=None: (c.hidden_size,)  # noqa: E731
Dh = lambda c, i: (c.layer_head_dim(i),)  # noqa: E731
QDIM = lambda c, i: c.num_attention_heads * c.layer_head_dim(i)  # noqa: E731   H * Dh of layer i
KVDIM = lambda c, i: c.layer_kv_heads(i) * c.layer_head_dim(i)  # noqa: E731   K * Dh of layer i
F = lambda c, i: c.layer_intermediate_size(i)  # noqa: E731
PLE = lambda c: c.num_hidden_layers * c.hidden_size_per_layer_input  # noqa: E731   L * P

MODEL_TENSORS = (
    TensorSpec("embed", "model.embed_tokens.weight", "token_embd.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec("final_norm", "model.norm.weight", "output_norm.weight", D),
    TensorSpec("embed_per_layer", "model.embed_tokens_per_layer.weight", "per_layer_token_embd.weight",
               lambda c: (c.vocab_size_per_layer_input, PLE(c)), _ple),
    TensorSpec("per_layer_model_proj", "model.per_layer_model_projection.weight", "per_layer_model_proj.weight",
               lambda c: (PLE(c), c.hidden_size), _ple),
    TensorSpec("per_layer_proj_norm", "model.per_layer_projection_norm.weight", "per_layer_proj_norm.weight",
               lambda c: (c.hidden_size_per_layer_input,), _ple),
)

LAYER_TENSORS = (
    #          field             Hugging Face                       GGUF                  shape
    TensorSpec("input_norm", "input_layernorm.weight", "attn_norm.weight", D),
    TensorSpec("q_proj", "self_attn.q_proj.weight", "attn_q.weight", lambda c, i: (QDIM(c, i), c.hidden_size)),
    TensorSpec("k_proj", "self_attn.k_proj.weight", "attn_k.weight", lambda c, i: (KVDIM(c, i), c.hidden_size),
               _own_kv),
    TensorSpec("v_proj", "self_attn.v_proj.weight", "attn_v.weight", lambda c, i: (KVDIM(c, i), c.hidden_size),
               _own_v),
    TensorSpec("o_proj", "self_attn.o_proj.weight", "attn_output.weight", lambda c, i: (c.hidden_size, QDIM(c, i))),
    TensorSpec("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", Dh, _qk_norm),
    TensorSpec("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", Dh, lambda c, i: c.qk_norm and _own_kv(c, i)),
    # The same Hugging Face name means two things: in Gemma 1 "post_attention_layernorm" is the norm
    # *before the MLP*; in Gemma 2/3/4 it is applied to the attention output and "pre_feedforward_layernorm"
    # is the one before the MLP. GGUF is consistent: ffn_norm is always the one before the MLP.
    TensorSpec("pre_mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight", D, _gemma1),
    TensorSpec("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight", D, _sandwich),
    TensorSpec("pre_mlp_norm", "pre_feedforward_layernorm.weight", "ffn_norm.weight", D, _pre_ffw),
    TensorSpec("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", D, _sandwich),
    TensorSpec("gate_proj", "mlp.gate_proj.weight", "ffn_gate.weight", lambda c, i: (F(c, i), c.hidden_size)),
    TensorSpec("up_proj", "mlp.up_proj.weight", "ffn_up.weight", lambda c, i: (F(c, i), c.hidden_size)),
    TensorSpec("down_proj", "mlp.down_proj.weight", "ffn_down.weight", lambda c, i: (c.hidden_size, F(c, i))),
    # Gemma 4. A buffer in transformers (no ".weight"); llama.cpp's converter appends ".weight" (Gemma4Model)
    TensorSpec("layer_scalar", "layer_scalar", "layer_output_scale.weight", lambda c, i: (1,), _gemma4),
    # per-layer embeddings: llama.cpp kept Gemma 3n's names (gguf constants.py PER_LAYER_*)
    TensorSpec("per_layer_gate", "per_layer_input_gate.weight", "inp_gate.weight",
               lambda c, i: (c.hidden_size_per_layer_input, c.hidden_size), _ple),
    TensorSpec("per_layer_proj", "per_layer_projection.weight", "proj.weight",
               lambda c, i: (c.hidden_size, c.hidden_size_per_layer_input), _ple),
    TensorSpec("post_per_layer_norm", "post_per_layer_input_norm.weight", "post_norm.weight", D, _ple),
    # mixture of experts: the router's scale and per-expert scale get GGUF names of their own (Gemma4Model
    # modify_tensors: "ffn_gate_inp.scale", "ffn_down_exps.scale")
    TensorSpec("router_scale", "router.scale", "ffn_gate_inp.scale", D, _moe),
    TensorSpec("router_proj", "router.proj.weight", "ffn_gate_inp.weight",
               lambda c, i: (c.num_experts, c.hidden_size), _moe),
    TensorSpec("expert_scale", "router.per_expert_scale", "ffn_down_exps.scale", lambda c, i: (c.num_experts,), _moe),
    TensorSpec("experts_gate_up", "experts.gate_up_proj", "ffn_gate_up_exps.weight",
               lambda c, i: (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size), _moe, stacked=True),
    TensorSpec("experts_down", "experts.down_proj", "ffn_down_exps.weight",
               lambda c, i: (c.num_experts, c.hidden_size, c.moe_intermediate_size), _moe, stacked=True),
    TensorSpec("pre_moe_norm", "pre_feedforward_layernorm_2.weight", "pre_ffw_norm_2.weight", D, _moe),
    TensorSpec("post_dense_norm", "post_feedforward_layernorm_1.weight", "post_ffw_norm_1.weight", D, _moe),
    TensorSpec("post_moe_norm", "post_feedforward_layernorm_2.weight", "post_ffw_norm_2.weight", D, _moe),
)

# GGUF tensors minigemma does not read: Gemma 4's rope_freqs (its proportional RoPE, as frequency factors for
# llama.cpp's kernel; config_from_gguf reads the partial rotary factor from it instead)
GGUF_IGNORED = ("rope_freqs.weight",)


def layer_specs(config: GemmaConfig, layer: int) -> list[TensorSpec]:
    """The tensors layer `layer` has."""
    return [s for s in LAYER_TENSORS if s.when(config, layer)]


def model_specs(config: GemmaConfig) -> list[TensorSpec]:
    return [s for s in MODEL_TENSORS if s.when(config)]


def count_parameters(config: GemmaConfig) -> int:
    """Parameters as transformers counts them (num_parameters): the tied head once, Gemma 4's layer_scalar
    not at all (a buffer there)."""
    total = sum(math.prod(s.shape(config)) for s in model_specs(config))
    return total + sum(math.prod(s.shape(config, i)) for i in range(config.num_hidden_layers)
                       for s in layer_specs(config, i) if s.field != "layer_scalar")


class _Expert(StoredTensor):
    """Expert e of a stacked (E, out, in) tensor, as a matrix of its own (weights.StoredTensor).

    Each expert is a small matrix; reading it takes one slice of the file's tensor along its first axis."""

    def __init__(self, t: StoredTensor, e: int):
        self.t, self.e, self.shape = t, e, tuple(t.shape[1:])

    def read(self) -> np.ndarray:
        return self.t.rows(self.e, self.e + 1)[0]  # (1, out, in) -> (out, in)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.read()[start:stop]

    def stored(self, kind: str):
        whole = self.t.stored(kind) if kind in ("bfloat16", "float16") else None
        return None if whole is None else Float16Bits(whole.data[self.e], kind)  # 16-bit: a view, as stored


LAYER_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}


def stores_full_gain(config: GemmaConfig, spec: TensorSpec, column: str) -> bool:
    """Whether the file stores this tensor as a norm's whole multiplier (1 + w) rather than the zero-centred w
    minigemma holds (module docstring): every norm of a GGUF file (llama.cpp adds the 1 when converting) and of
    a Gemma 4 checkpoint (config.norm_gain_is_w). Loading takes the 1 off (build_params), writing puts it back
    (lora.write_hf_directory)."""
    return spec.field.endswith("_norm") and (column == "gguf" or config.norm_gain_is_w)


def build_params(config: GemmaConfig, tensors: Mapping[str, StoredTensor], column: str, source: str,
                 ignore: Iterable[str] = (), quantize: str | None = None, dtype: str | None = None,
                 prepare: Callable = lambda w: w, done: Callable[[], None] = lambda: None) -> Params:
    """Fill Params from a file's tensors, by the names in one column ("hf" or "gguf") of the table.

    `tensors` maps each name in the file to a StoredTensor (weights.py): its shape is checked before anything
    is read, then it is read straight into its storage (float32, or `quantize` / `dtype` for matrices), one
    tensor at a time, so no float32 copy of the whole model ever exists. A missing tensor, a wrong shape, or
    a tensor the table does not name (other than those in `ignore`) is an error naming it: a silent mismatch
    here would give a model that runs and talks nonsense. `prepare` puts each weight in the layout of the
    backend that will run it (Backend.prepare); `done` is called after each tensor (progress bars).
    """
    used: set[str] = set()

    def fetch(spec: TensorSpec, layer: int | None):
        name = getattr(spec, column)
        if layer is not None:
            name = LAYER_PREFIX[column].format(layer) + name
        if name not in tensors:
            raise ModelFileError(f"{source}: tensor {name} is missing")
        t = tensors[name]
        shape = spec.shape(config) if layer is None else spec.shape(config, layer)
        if tuple(t.shape) != shape:
            raise ModelFileError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        used.add(name)
        kind = storage_for(spec.field, quantize, dtype, layer, config.num_hidden_layers)
        try:
            if spec.stacked:  # one matrix per expert, each stored and prepared as any matrix
                weight = [prepare(to_weight(_Expert(t, e), kind)) for e in range(shape[0])]
            else:
                weight = prepare(to_weight(t, kind))  # the layout the backend's kernels read best
        except ModelFileError:
            raise
        except ValueError as e:  # e.g. a GGML type we can't dequantize, or a width int8 can't group
            raise ModelFileError(f"{source}: tensor {name}: {e}") from None
        if stores_full_gain(config, spec, column):
            weight = weight - np.float32(1.0)  # w -> w - 1: rms_norm multiplies by (1 + stored)
        done()
        return weight

    top = {s.field: fetch(s, None) for s in model_specs(config)}
    layers = [LayerParams(**{s.field: fetch(s, i) for s in layer_specs(config, i)})
              for i in range(config.num_hidden_layers)]
    unexpected = sorted(set(tensors) - used - set(ignore))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelFileError(f"{source}: unexpected tensor {unexpected[0]}{more}")
    return Params(layers=layers, **top)


def params_nbytes(params: Params) -> int:
    """Bytes of all weights as held in memory (a memory-mapped view counts as what it would occupy)."""
    arrays = [w for w in vars(params).values() if w is not None and not isinstance(w, list)]
    arrays += [w for layer in params.layers for w in vars(layer).values() if w is not None]
    arrays = [m for w in arrays for m in (w if isinstance(w, list) else [w])]  # experts: one matrix each
    return sum(nbytes(w) for w in arrays)
