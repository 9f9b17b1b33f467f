"""One configuration for Gemma 1, 2, 3 and 4 text models (and VaultGemma), with Hugging Face field names.

The Gemma generations differ in *data*, not in code paths:

    field                    Gemma 1 (gemma)    Gemma 2 (gemma2)        Gemma 3 (gemma3_text)   Gemma 4 (gemma4_text)
    layer_types              all full           [sliding, full] x N/2   [sliding x5, full] x N/6  same, last layer full
    sliding_window           -                  4096                    512 (270m, 1b), 1024     512 (E-series), 1024
    query_pre_attn_scalar    head_dim           256 (144 on 27B)        256 (168 on 27B)        - (scale 1.0)
    attn_logit_softcapping   -                  50.0                    -                       -
    final_logit_softcapping  -                  30.0                    -                       30.0
    sandwich_norms           no (2 per block)   yes (4 per block)       yes (4 per block)       yes
    qk_norm                  no                 no                      yes                     yes (+ value norm)
    norm gain                1 + w              1 + w                   1 + w                   w
    rope theta per type      10k                10k                     full 1M, sliding 10k    full 1M proportional
                                                                        (+linear x8 on 4b+)     (25% of pairs), sliding 10k

VaultGemma (vaultgemma) is Gemma 2 without the norms on the attention and MLP outputs (sandwich_norms off).

What Gemma 4 adds is read from its own fields (transformers models/gemma4/configuration_gemma4.py), each used
by one function only where the field says so (model.py):

    per_layer_config          per layer: its own head_dim and num_key_value_heads (global layers: 512 and
                              fewer kv heads). Older configs say global_head_dim / num_global_key_value_heads.
    rope "proportional"       global layers rotate only the first partial_rotary_factor of the pairs, with the
                              frequencies of the full head dim; the other pairs get frequency 0 (not rotated)
    attention_k_eq_v          global layers have no v_proj: V is the raw K projection (before k_norm and RoPE)
    hidden_size_per_layer_input  per-layer embeddings (the E-series): a third residual branch in every block,
                              fed by a token table of vocab_size_per_layer_input rows and a projection of x
    num_kv_shared_layers      the last layers have no K/V of their own: they reuse those of the last unshared
                              layer of their type (kv_source); use_double_wide_mlp doubles their MLP width
    enable_moe_block          experts beside the dense MLP: num_experts, top_k_experts, moe_intermediate_size
    (always)                  layer_scalar: every block's output is multiplied by a learned scalar

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

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma4_text", "vaultgemma")
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}  # their language model is in text_config

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
    # Gemma4TextConfig: note hidden_size_per_layer_input defaults to 256 (per-layer embeddings on) and
    # global layers to head dim 512 (global_head_dim) when the file has no per_layer_config
    "gemma4_text": dict(vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        sliding_window=512, final_logit_softcapping=None, attn_logit_softcapping=None,
                        query_pre_attn_scalar=None, vocab_size_per_layer_input=262144,
                        hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=0,
                        enable_moe_block=False, use_double_wide_mlp=False, global_head_dim=512,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                         "full_attention": {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                                                            "partial_rotary_factor": 0.25}}),
}
_DEFAULTS["vaultgemma"] = _DEFAULTS["gemma2"]  # VaultGemmaConfig is Gemma2Config


@dataclass(frozen=True)
class Rope:
    """RoPE parameters of one layer type."""

    theta: float  # base of the frequencies: inv_freq_i = theta^(-2i/Dh)
    factor: float = 1.0  # linear scaling ("position interpolation"): inv_freq is divided by it
    # Gemma 4's "proportional" RoPE on global layers: only the first partial_rotary_factor * Dh/2 pairs rotate
    # (with the frequencies of the full Dh), the rest get frequency 0. 1.0: every pair rotates.
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma" (Gemma 1), "gemma2", "gemma3_text", "gemma4_text" or "vaultgemma"
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
    # ---- Gemma 4 (all off by default, so Gemma 1/2/3 read exactly as before) ----
    per_layer_config: dict = field(default_factory=dict)  # layer -> {"head_dim": .., "num_key_value_heads": ..}
    attention_k_eq_v: bool = False  # global layers: no v_proj, V = the raw K projection
    hidden_size_per_layer_input: int = 0  # P, width of the per-layer embeddings; 0: none
    vocab_size_per_layer_input: int = 0  # rows of the per-layer token table
    num_kv_shared_layers: int = 0  # the last this-many layers reuse an earlier layer's keys and values
    use_double_wide_mlp: bool = False  # KV-shared layers have an MLP of width 2F
    enable_moe_block: bool = False  # experts beside the dense MLP
    num_experts: int = 0  # E
    top_k_experts: int = 0  # experts each token is sent to
    moe_intermediate_size: int = 0  # I, width of each expert's GeGLU
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json as read, for reference

    # ---- derived values, in one place -------------------------------------------------------------------
    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2, 3 and 4 norm both the input and the output of attention and MLP ("sandwich"); VaultGemma
        (a Gemma 2) drops the output norms (transformers VaultGemmaDecoderLayer)."""
        return self.model_type not in ("gemma", "vaultgemma")

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 and 4 RMS-normalise each query and key head (replacing Gemma 2's soft-capping)."""
        return self.model_type in ("gemma3_text", "gemma4_text")

    @property
    def value_norm(self) -> bool:
        """Gemma 4 also RMS-normalises each value head, with no gain (transformers Gemma4TextAttention v_norm)."""
        return self.model_type == "gemma4_text"

    @property
    def norm_gain_is_w(self) -> bool:
        """Gemma 4's RMSNorm multiplies by w, not by Gemma 1-3's (1 + w) (transformers Gemma4RMSNorm).

        minigemma keeps one RMSNorm, with (1 + w): a Gemma 4 gain is stored as w - 1 when it is loaded
        (params.build_params), so layers.rms_norm and its Numba twin serve every version unchanged, and a
        norm without a weight (value norm, router norm) is the stored gain 0. Rounding w - 1 to float32 and
        adding the 1 back costs at most an ulp of w, far below float32 model noise."""
        return self.model_type == "gemma4_text"

    @property
    def per_layer_embeddings(self) -> bool:
        """Gemma 4 E-series: every block has a third residual branch fed by per-layer embeddings."""
        return self.hidden_size_per_layer_input > 0

    @property
    def attn_scale(self) -> float:
        """Scores are q.k * attn_scale. Gemma 1: head_dim^-1/2; Gemma 2/3: query_pre_attn_scalar^-1/2.

        They differ only on the 27B models (144 and 168 instead of 256), which several ports got wrong
        at first (gemma_pytorch 03e6575, gemma.cpp 5a751a9, llama.cpp #8197)."""
        if self.model_type == "gemma4_text":  # q, k and v are all RMS-normalised: no scale (self.scaling = 1.0)
            return 1.0
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

    def layer_head_dim(self, layer: int) -> int:
        """Dh of one layer: head_dim, or its per_layer_config override (Gemma 4 global layers)."""
        return int(self.per_layer_config.get(layer, {}).get("head_dim", self.head_dim))

    def layer_kv_heads(self, layer: int) -> int:
        """K of one layer: num_key_value_heads, or its per_layer_config override."""
        return int(self.per_layer_config.get(layer, {}).get("num_key_value_heads", self.num_key_value_heads))

    def has_v_proj(self, layer: int) -> bool:
        """attention_k_eq_v: Gemma 4's global layers take V from the K projection (transformers
        use_alternative_attention = attention_k_eq_v and not is_sliding)."""
        return not (self.attention_k_eq_v and self.layer_types[layer] == FULL)

    def kv_shared(self, layer: int) -> bool:
        """The last num_kv_shared_layers layers compute no keys or values of their own."""
        return layer >= self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values this layer attends over: itself, or for a KV-shared layer the last
        unshared layer of the same type (transformers Gemma4TextConfig.kv_sharing_modes)."""
        if not self.kv_shared(layer):
            return layer
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        return max(i for i in range(first_shared) if self.layer_types[i] == self.layer_types[layer])

    def layer_intermediate_size(self, layer: int) -> int:
        """F of one layer: doubled on KV-shared layers with use_double_wide_mlp (Gemma4TextMLP)."""
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.kv_shared(layer) else 1)

    @property
    def num_parameters(self) -> int:
        """Parameter count with the tied embedding counted once (as transformers' num_parameters), from the
        tensor table (params.py): every shape counted once, in one place."""
        from .params import count_parameters  # params imports this module

        return count_parameters(self)

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
        """Build a config from a config.json dict, legacy or current style, in four named steps."""
        model_type, data = _text_part(data)
        d = _with_defaults(model_type, data)
        _refuse_unsupported(model_type, data)
        layer_types = _read_layer_types(model_type, d)
        gemma4 = _read_gemma4(d, layer_types) if model_type == "gemma4_text" else {}

        eos = d.get("eos_token_id", 1)
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            layer_types=layer_types,
            rope=_read_rope(model_type, d),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d["max_position_embeddings"]),
            query_pre_attn_scalar=None if model_type in ("gemma", "gemma4_text") else d["query_pre_attn_scalar"],
            sliding_window=d.get("sliding_window") if SLIDING in layer_types else None,
            # Only Gemma 2 (and VaultGemma) caps attention scores (Gemma 3 replaced it with QK-norm); Gemma 1
            # caps nothing. transformers ignores these fields where the model has no cap, even when set.
            attn_logit_softcapping=(d.get("attn_logit_softcapping") if model_type in ("gemma2", "vaultgemma")
                                    else None),
            final_logit_softcapping=None if model_type == "gemma" else d.get("final_logit_softcapping"),
            bos_token_id=int(d.get("bos_token_id", 2)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (int(eos),),
            pad_token_id=int(d.get("pad_token_id", 0)),
            **gemma4,
            extra=data,
        )


# ---- the steps of from_hf_dict -----------------------------------------------------------------------------

def _text_part(data: dict) -> tuple[str, dict]:
    """The model type and the fields of the text model: a multimodal config (Gemma 3 4b+, Gemma 4) keeps its
    language model in text_config."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type in MULTIMODAL:
        model_type = MULTIMODAL[model_type]
        data = {**(data.get("text_config") or {}), "model_type": model_type}
    if model_type not in MODEL_TYPES:
        raise InvalidArgument(f"model_type {model_type!r} is not a Gemma text model (expected one of "
                              f"{', '.join(MODEL_TYPES + tuple(MULTIMODAL))})")
    return model_type, data


def _with_defaults(model_type: str, data: dict) -> dict:
    """The file's fields over transformers' defaults. A field the file leaves out (or sets to null) takes the
    default, except where null means something: no soft-cap, no window."""
    nullable = {"attn_logit_softcapping", "final_logit_softcapping", "sliding_window"}
    d = dict(_DEFAULTS[model_type])
    d.update({k: v for k, v in data.items() if v is not None or k in nullable})
    return d


def _refuse_unsupported(model_type: str, data: dict) -> None:
    """Configs that would describe another model than the one minigemma computes, refused by name.

    transformers reads the activation from `hidden_act` for Gemma 1 and `hidden_activation` for Gemma 2/3/4
    (ignoring the other key). Gemma 1 configs say "gelu", but Gemma was trained with the tanh approximation;
    transformers rewrites it with a warning (transformers#29402). On Gemma 2/3 it runs "gelu" as exact erf GELU,
    so there it would be a different model, as would anything else."""
    act = data.get("hidden_act" if model_type == "gemma" else "hidden_activation") or "gelu_pytorch_tanh"
    tanh_gelu = ("gelu_pytorch_tanh", "gelu_new") + (("gelu",) if model_type == "gemma" else ())
    if act not in tanh_gelu:
        raise InvalidArgument(f"hidden activation {act!r} is not supported (Gemma uses tanh GELU: "
                              f"{', '.join(tanh_gelu)})")
    # Gemma 4's "vision" makes only image tokens attend both ways: text is causal, as here
    if data.get("use_bidirectional_attention") not in (None, False, "vision"):
        raise InvalidArgument(f"use_bidirectional_attention={data['use_bidirectional_attention']!r} (an encoder "
                              "variant) is not supported")
    if data.get("tie_word_embeddings") is False:
        raise InvalidArgument("tie_word_embeddings=false is not supported: every Gemma ties its LM head")


def _read_layer_types(model_type: str, d: dict) -> tuple[str, ...]:
    """Each layer's attention type: `layer_types` (current configs), or the legacy pattern: Gemma 1 all
    global, Gemma 2 alternating from a local layer 0, Gemma 3 every 6th layer global (sliding_window_pattern).
    Gemma 4's last layer is always global (transformers forces it, with a warning)."""
    n = d["num_hidden_layers"]
    layer_types = d.get("layer_types")
    if layer_types is None:
        if model_type == "gemma":
            layer_types = [FULL] * n
        else:
            pattern = 2 if model_type in ("gemma2", "vaultgemma") else int(d.get("sliding_window_pattern") or 6)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    layer_types = tuple(layer_types)
    if len(layer_types) != n or not set(layer_types) <= {SLIDING, FULL}:
        raise InvalidArgument(f"layer_types must list {n} entries of {SLIDING!r}/{FULL!r}, got {layer_types}")
    if model_type == "gemma4_text" and layer_types[-1] != FULL:
        layer_types = layer_types[:-1] + (FULL,)
    if SLIDING in layer_types and not d.get("sliding_window"):
        raise InvalidArgument("sliding layers need a sliding_window")
    return layer_types


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
        if kind not in ("default", "linear", "proportional"):
            raise InvalidArgument(f"rope type {kind!r} ({layer_type}) is not supported (only default, linear and "
                                  "proportional)")
        default_theta = d.get("rope_theta", 10_000.0)  # Gemma 4 files give a theta per type; Gemma 1-3 this
        if layer_type == SLIDING:
            default_theta = d.get("rope_local_base_freq", default_theta)
        # proportional (Gemma 4): transformers _compute_proportional_rope_parameters; factor divides as linear's
        rope[layer_type] = Rope(theta=float(p.get("rope_theta", default_theta)),
                                factor=float(p.get("factor", 1.0)) if kind != "default" else 1.0,
                                partial_rotary_factor=(float(p.get("partial_rotary_factor") or 1.0)
                                                       if kind == "proportional" else 1.0))
    return rope


PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")  # what a per_layer_config entry may override


def _read_gemma4(d: dict, layer_types: tuple[str, ...]) -> dict:
    """Gemma 4's fields (module docstring), from a config.json dict with defaults filled in.

    Per-layer head dims and kv-head counts come in two styles: a `per_layer_config` {layer: {field: value}}
    (what transformers 5 saves; keys may be zero-padded strings), or the flat `global_head_dim` and
    `num_global_key_value_heads` of the published configs, which transformers turns into the same overrides
    for every full-attention layer (the kv-head count only with attention_k_eq_v: Gemma4TextConfig.__post_init__).
    """
    n = len(layer_types)
    if d.get("per_layer_config") is not None:
        per_layer = {}
        for key, fields in d["per_layer_config"].items():
            layer = int(key)
            if not 0 <= layer < n or not isinstance(fields, dict):
                raise InvalidArgument(f"per_layer_config: entry {key!r} is not a layer index in [0, {n}) with an "
                                      "object of fields")
            unknown = sorted(set(fields) - set(PER_LAYER_FIELDS))
            if unknown:
                raise InvalidArgument(f"per_layer_config[{key}]: field {unknown[0]!r} is not supported (only "
                                      f"{', '.join(PER_LAYER_FIELDS)})")
            per_layer[layer] = {k: int(v) for k, v in fields.items()}
    else:
        override = {"head_dim": int(d.get("global_head_dim") or 512)}
        if d.get("attention_k_eq_v") and d.get("num_global_key_value_heads") is not None:
            override["num_key_value_heads"] = int(d["num_global_key_value_heads"])
        per_layer = {i: dict(override) for i, t in enumerate(layer_types) if t == FULL}
    shared = int(d.get("num_kv_shared_layers") or 0)
    if shared:
        producers = set(layer_types[:n - shared])
        if not 0 < shared < n or producers != set(layer_types[n - shared:]) | producers:
            raise InvalidArgument(f"num_kv_shared_layers={shared}: every type of the shared layers needs an "
                                  "unshared layer of the same type before them")
    moe = bool(d.get("enable_moe_block"))
    if moe and not all(d.get(k) for k in ("num_experts", "top_k_experts", "moe_intermediate_size")):
        raise InvalidArgument("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
    return dict(per_layer_config=per_layer, attention_k_eq_v=bool(d.get("attention_k_eq_v")),
                hidden_size_per_layer_input=int(d.get("hidden_size_per_layer_input") or 0),
                vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or d["vocab_size"]),
                num_kv_shared_layers=shared, use_double_wide_mlp=bool(d.get("use_double_wide_mlp")),
                enable_moe_block=moe, num_experts=int(d.get("num_experts") or 0) if moe else 0,
                top_k_experts=int(d.get("top_k_experts") or 0) if moe else 0,
                moe_intermediate_size=int(d.get("moe_intermediate_size") or 0) if moe else 0)
