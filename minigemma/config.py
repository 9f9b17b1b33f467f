"""One configuration for Gemma 1, 2 and 3 text models, with Hugging Face field names.

The three Gemma generations differ in *data*, not in code paths:

    field                    Gemma 1 (gemma)    Gemma 2 (gemma2)        Gemma 3 (gemma3_text)
    layer_types              all full           [sliding, full] x N/2   [sliding x5, full] x N/6
    sliding_window           -                  4096                    512 (270m, 1b), 1024 (4b+)
    query_pre_attn_scalar    head_dim           256 (144 on 27B)        256 (168 on 27B)
    attn_logit_softcapping   -                  50.0                    -
    final_logit_softcapping  -                  30.0                    -
    sandwich_norms           no (2 per block)   yes (4 per block)       yes (4 per block)
    qk_norm                  no                 no                      yes
    rope theta per type      10k                10k                     full 1M, sliding 10k (+linear x8 on 4b+ full)

`GemmaConfig.from_hf_dict` reads both config.json styles: the legacy one that published checkpoints carry
(`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`, `hidden_act: "gelu"`) and the
current transformers one (`rope_parameters`, `layer_types`). Everything derived (each layer's type, the
attention scale, each layer's RoPE base and scaling) is computed here and nowhere else.

Shape glossary used across minigemma:
    T  new tokens in this call        S  key/value positions attended to (cache + new)
    D  hidden_size                    F  intermediate_size (MLP width)
    H  num_attention_heads            K  num_key_value_heads        G = H // K query heads per kv head
    Dh head_dim                       V  vocab_size
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgument, ModelFileError

# The config.json files of Google's published checkpoints, shipped with the package (configs/README.md)
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "configs"

SLIDING = "sliding_attention"
FULL = "full_attention"

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")

# transformers' defaults for fields a config.json may leave out, per model type
# (transformers/models/gemma*/configuration_gemma*.py). A checkpoint saved by transformers writes them all;
# hand-written and legacy configs often omit some, and then these are what transformers assumes.
_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rope_theta=10_000.0, query_pre_attn_scalar=None, sliding_window=None,
                  attn_logit_softcapping=None, final_logit_softcapping=None),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        attn_logit_softcapping=None, final_logit_softcapping=None),
}


@dataclass(frozen=True)
class Rope:
    """RoPE parameters of one layer type."""

    theta: float  # base of the frequencies: inv_freq_i = theta^(-2i/Dh)
    factor: float = 1.0  # linear scaling ("position interpolation"): inv_freq is divided by it


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma" (Gemma 1), "gemma2" or "gemma3_text"
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F, width of the GeGLU MLP
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # K: 1 = multi-query (2b, 3-270m), H = multi-head (7b), between = grouped
    head_dim: int  # Dh; H * Dh need not equal D (gemma-7b: 16 * 256 = 4096 != 3072)
    layer_types: tuple[str, ...]  # per layer, SLIDING or FULL
    rope: dict[str, Rope]  # per layer type
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2; None: head_dim (Gemma 1)
    sliding_window: int | None = None  # W: a query sees itself and the W-1 keys before it
    attn_logit_softcapping: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json as read, for reference

    # ---- derived values, in one place -------------------------------------------------------------------
    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2 and 3 norm both the input and the output of attention and MLP ("sandwich")."""
        return self.model_type != "gemma"

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 RMS-normalises each query and key head (replacing Gemma 2's soft-capping)."""
        return self.model_type == "gemma3_text"

    @property
    def attn_scale(self) -> float:
        """Scores are q.k * attn_scale. Gemma 1: head_dim^-1/2; Gemma 2/3: query_pre_attn_scalar^-1/2.

        They differ only on the 27B models (144 and 168 instead of 256), which several ports got wrong
        at first (gemma_pytorch 03e6575, gemma.cpp 5a751a9, llama.cpp #8197)."""
        scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return scalar**-0.5

    @property
    def embed_scale(self) -> float:
        """Embeddings are multiplied by sqrt(D) (transformers casts it to the weight dtype first; we compute
        in float32, as transformers does with float32 weights)."""
        return math.sqrt(self.hidden_size)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for a global (full attention) layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def layer_rope(self, layer: int) -> Rope:
        return self.rope[self.layer_types[layer]]

    @property
    def num_parameters(self) -> int:
        """Parameter count with the tied embedding counted once (as transformers' num_parameters)."""
        D, F, H, K, Dh = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                          self.num_key_value_heads, self.head_dim)
        attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D
        mlp = 3 * D * F
        norms = (4 if self.sandwich_norms else 2) * D + (2 * Dh if self.qk_norm else 0)
        return self.vocab_size * D + self.num_hidden_layers * (attention + mlp + norms) + D

    # ---- reading config.json --------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "GemmaConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
            raise ModelFileError(f"{path}: cannot read config.json ({e})") from None
        try:
            return cls.from_hf_dict(data)
        except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:  # a field of the wrong kind or value
            raise ModelFileError(f"{path}: {e}") from None

    @classmethod
    def from_hf_dict(cls, data: dict) -> "GemmaConfig":
        """Build a config from a config.json dict, legacy or current style."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type == "gemma3":  # multimodal Gemma 3 (4b+): the language model is in text_config
            data = {"model_type": "gemma3_text", **(data.get("text_config") or {})}
            model_type = "gemma3_text"
        if model_type not in MODEL_TYPES:
            raise InvalidArgument(f"model_type {model_type!r} is not a Gemma text model (expected one of "
                             f"{', '.join(MODEL_TYPES + ('gemma3',))})")
        # A field the file leaves out (or sets to null) takes transformers' default, except where null means
        # something: no soft-cap, no window.
        nullable = {"attn_logit_softcapping", "final_logit_softcapping", "sliding_window"}
        d = dict(_DEFAULTS[model_type])
        d.update({k: v for k, v in data.items() if v is not None or k in nullable})

        # transformers reads the activation from `hidden_act` for Gemma 1 and `hidden_activation` for Gemma 2/3
        # (ignoring the other key). Gemma 1 configs say "gelu", but Gemma was trained with the tanh
        # approximation; transformers rewrites it with a warning (transformers#29402). On Gemma 2/3 it runs
        # "gelu" as exact erf GELU, so there it would be a different model, as would anything else.
        act = data.get("hidden_act" if model_type == "gemma" else "hidden_activation") or "gelu_pytorch_tanh"
        tanh_gelu = ("gelu_pytorch_tanh", "gelu_new") + (("gelu",) if model_type == "gemma" else ())
        if act not in tanh_gelu:
            raise InvalidArgument(f"hidden activation {act!r} is not supported (Gemma uses tanh GELU: "
                             f"{', '.join(tanh_gelu)})")
        if data.get("use_bidirectional_attention"):
            raise InvalidArgument("use_bidirectional_attention=true (an encoder variant) is not supported")
        if data.get("tie_word_embeddings") is False:
            raise InvalidArgument("tie_word_embeddings=false is not supported: every Gemma ties its LM head")

        n = d["num_hidden_layers"]
        layer_types = d.get("layer_types")
        if layer_types is None:
            if model_type == "gemma":
                layer_types = [FULL] * n
            else:  # legacy: Gemma 2 alternates from a local layer 0; Gemma 3 has every 6th layer global
                pattern = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern") or 6)
                layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        layer_types = tuple(layer_types)
        if len(layer_types) != n or not set(layer_types) <= {SLIDING, FULL}:
            raise InvalidArgument(f"layer_types must list {n} entries of {SLIDING!r}/{FULL!r}, got {layer_types}")
        if SLIDING in layer_types and not d.get("sliding_window"):
            raise InvalidArgument("sliding layers need a sliding_window")

        eos = d.get("eos_token_id", 1)
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            layer_types=layer_types,
            rope=_read_rope(model_type, d),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d["max_position_embeddings"]),
            query_pre_attn_scalar=None if model_type == "gemma" else d["query_pre_attn_scalar"],
            sliding_window=d.get("sliding_window") if SLIDING in layer_types else None,
            # Only Gemma 2 caps attention scores (Gemma 3 replaced it with QK-norm); Gemma 1 caps nothing.
            # transformers ignores these fields where the model has no cap, even when a config sets them.
            attn_logit_softcapping=d.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcapping=None if model_type == "gemma" else d.get("final_logit_softcapping"),
            bos_token_id=int(d.get("bos_token_id", 2)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (int(eos),),
            pad_token_id=int(d.get("pad_token_id", 0)),
            extra=data,
        )


def published_config(name: str) -> GemmaConfig:
    """The config of a published checkpoint, by name: "gemma-2b", "gemma-7b", "gemma-2-2b", "gemma-3-270m",
    "gemma-3-1b" (the files in minigemma/configs/, as published on the Hugging Face Hub)."""
    path = PUBLISHED_CONFIGS / f"{name}.json"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PUBLISHED_CONFIGS.glob("*.json")))
        raise InvalidArgument(f"no published config named {name!r} (expected one of {names})")
    return GemmaConfig.from_json(path)


def _read_rope(model_type: str, d: dict) -> dict[str, Rope]:
    """RoPE per layer type from either style.

    current: rope_parameters = {"rope_type": "default", "rope_theta": 1e4}            (Gemma 1/2)
             rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}  (Gemma 3)
    legacy:  rope_theta (+ Gemma 3: rope_local_base_freq for sliding layers, rope_scaling for full ones only,
             "this rope_scaling is only applied for global layers", llama.cpp convert_hf_to_gguf.py)
    """
    params = d.get("rope_parameters")
    if params is not None and FULL in params:  # Gemma 3, current style: one entry per layer type
        per_type = {t: params.get(t) or {} for t in (FULL, SLIDING)}
    elif params is not None:  # one set for all layers
        per_type = {FULL: params, SLIDING: params}
    else:  # legacy
        full = {"rope_theta": d["rope_theta"], **(d.get("rope_scaling") or {})}
        # Gemma 3 gives sliding layers their own base and no scaling; Gemma 1/2 use one set everywhere
        sliding = {"rope_theta": d["rope_local_base_freq"]} if model_type == "gemma3_text" else full
        per_type = {FULL: full, SLIDING: sliding}
    rope = {}
    for layer_type, p in per_type.items():
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise InvalidArgument(f"rope type {kind!r} ({layer_type}) is not supported (only default and linear)")
        default_theta = d["rope_theta"] if layer_type == FULL else d.get("rope_local_base_freq", d["rope_theta"])
        rope[layer_type] = Rope(theta=float(p.get("rope_theta", default_theta)),
                                factor=float(p.get("factor", 1.0)) if kind == "linear" else 1.0)
    return rope
