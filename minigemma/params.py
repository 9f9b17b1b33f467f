"""The model's parameters as plain data, and the one table that names every tensor.

The dataclasses mirror the call tree (Params -> layers -> LayerParams). The table `LAYER_TENSORS` is the
single place that says which tensor of a Hugging Face checkpoint or of a GGUF file fills which field, what
shape it must have, and on which Gemma versions it exists. Both loaders read it; neither hard-codes a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from .config import GemmaConfig
from .errors import ModelFileError
from .weights import StoredTensor, nbytes, storage_for, to_weight


@dataclass
class LayerParams:
    """One transformer block. Norm weights are zero-centred: the norm multiplies by (1 + w).

    Matrices are float32 ndarrays in the reference, or any weight type of weights.py; norms are float32."""

    input_norm: np.ndarray  # (D,)         before attention
    q_proj: np.ndarray  # (H*Dh, D)
    k_proj: np.ndarray  # (K*Dh, D)
    v_proj: np.ndarray  # (K*Dh, D)
    o_proj: np.ndarray  # (D, H*Dh)
    pre_mlp_norm: np.ndarray  # (D,)       before the MLP
    gate_proj: np.ndarray  # (F, D)
    up_proj: np.ndarray  # (F, D)
    down_proj: np.ndarray  # (D, F)
    post_attn_norm: np.ndarray | None = None  # (D,)   Gemma 2/3: on the attention output
    post_mlp_norm: np.ndarray | None = None  # (D,)    Gemma 2/3: on the MLP output
    q_norm: np.ndarray | None = None  # (Dh,)          Gemma 3: on each query head
    k_norm: np.ndarray | None = None  # (Dh,)          Gemma 3: on each key head


@dataclass
class Params:
    embed: np.ndarray  # (V, D)   token embedding, also the (tied) output head
    final_norm: np.ndarray  # (D,)
    layers: list[LayerParams]


@dataclass(frozen=True)
class TensorSpec:
    field: str  # LayerParams / Params field
    hf: str  # name in a Hugging Face checkpoint (per layer: under "model.layers.{i}.")
    gguf: str  # name in a GGUF file written by llama.cpp's converter (per layer: under "blk.{i}.")
    shape: Callable[[GemmaConfig], tuple[int, ...]]
    when: Callable[[GemmaConfig], bool] = lambda c: True


def _gemma1(c):
    return not c.sandwich_norms


def _sandwich(c):
    return c.sandwich_norms


def _qk_norm(c):
    return c.qk_norm


D = lambda c: (c.hidden_size,)  # noqa: E731
Dh = lambda c: (c.head_dim,)  # noqa: E731

MODEL_TENSORS = (
    TensorSpec("embed", "model.embed_tokens.weight", "token_embd.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec("final_norm", "model.norm.weight", "output_norm.weight", D),
)

LAYER_TENSORS = (
    #          field             Hugging Face                       GGUF                  shape
    TensorSpec("input_norm", "input_layernorm.weight", "attn_norm.weight", D),
    TensorSpec("q_proj", "self_attn.q_proj.weight", "attn_q.weight",
               lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    TensorSpec("k_proj", "self_attn.k_proj.weight", "attn_k.weight",
               lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    TensorSpec("v_proj", "self_attn.v_proj.weight", "attn_v.weight",
               lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    TensorSpec("o_proj", "self_attn.o_proj.weight", "attn_output.weight",
               lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    TensorSpec("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", Dh, _qk_norm),
    TensorSpec("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", Dh, _qk_norm),
    # The same Hugging Face name means two things: in Gemma 1 "post_attention_layernorm" is the norm
    # *before the MLP*; in Gemma 2/3 it is applied to the attention output and "pre_feedforward_layernorm"
    # is the one before the MLP. GGUF is consistent: ffn_norm is always the one before the MLP.
    TensorSpec("pre_mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight", D, _gemma1),
    TensorSpec("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight", D, _sandwich),
    TensorSpec("pre_mlp_norm", "pre_feedforward_layernorm.weight", "ffn_norm.weight", D, _sandwich),
    TensorSpec("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", D, _sandwich),
    TensorSpec("gate_proj", "mlp.gate_proj.weight", "ffn_gate.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    TensorSpec("up_proj", "mlp.up_proj.weight", "ffn_up.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    TensorSpec("down_proj", "mlp.down_proj.weight", "ffn_down.weight", lambda c: (c.hidden_size, c.intermediate_size)),
)


LAYER_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}


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
        if tuple(t.shape) != spec.shape(config):
            raise ModelFileError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {spec.shape(config)}")
        used.add(name)
        try:
            weight = to_weight(t, storage_for(spec.field, quantize, dtype, layer, config.num_hidden_layers))
        except ModelFileError:
            raise
        except ValueError as e:  # e.g. a GGML type we can't dequantize, or a width int8 can't group
            raise ModelFileError(f"{source}: tensor {name}: {e}") from None
        weight = prepare(weight)  # the layout the backend's kernels read best (kernels_numba.prepare)
        done()
        return weight

    top = {s.field: fetch(s, None) for s in MODEL_TENSORS}
    layers = [LayerParams(**{s.field: fetch(s, i) for s in LAYER_TENSORS if s.when(config)})
              for i in range(config.num_hidden_layers)]
    unexpected = sorted(set(tensors) - used - set(ignore))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelFileError(f"{source}: unexpected tensor {unexpected[0]}{more}")
    return Params(layers=layers, **top)


def params_nbytes(params: Params) -> int:
    """Bytes of all weights as held in memory (a memory-mapped view counts as what it would occupy)."""
    arrays = [params.embed, params.final_norm] + [w for layer in params.layers for w in vars(layer).values()]
    return sum(nbytes(w) for w in arrays if w is not None)
