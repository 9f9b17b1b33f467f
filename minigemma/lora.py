"""LoRA adapters on a loaded model: add them, save and load them as PEFT does, fold them in, write HF folders.

An adapter replaces a block's matrix W (out, in), whatever its storage, by weights.LoRA(W, A, B, alpha / r):
the layer computes x W^T + (alpha / r) (x A^T) B^T, with A (r, in) and B (out, r) float32 and W frozen.
Over an int8 or int4 W that is QLoRA (Dettmers et al. 2023): the base stays 1 byte (or 0.6) per weight
while the adapters train in float32.

Adapters travel in PEFT's format, so an adapter trained here loads with `peft.PeftModel.from_pretrained` on
the transformers model of the same checkpoint, and one trained with peft loads here:

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)
                               base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)
                               ... the same under mlp.{gate,up,down}_proj

(peft 0.21 `utils/save_and_load.py` get_peft_model_state_dict drops the adapter name "default" from the
keys; the prefix is PeftModel's `base_model.model.` before the transformers module path. Gemma 1, 2, 3 and 4
text models all use the same module names; Gemma 4's experts are not nn.Linear modules, so target_modules
reaches none of them, here or in peft.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import FULL, SLIDING, GemmaConfig
from .errors import InvalidArgument, ModelFileError
from .params import LAYER_PREFIX, Params, layer_specs, model_specs, stores_full_gain
from .weights import LoRA, dequantize

# The matrices an adapter can sit on: LayerParams field -> transformers module path inside a block
MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}
# All of them by default: with QLoRA, adapting every linear layer is what matches full fine-tuning
# (Dettmers et al. 2023, section 4), and on the 270M model it costs 1.9M trainable weights at rank 8
# (0.7% of the model).
DEFAULT_TARGETS = tuple(MODULES)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"q,v" or "q_proj,v_proj" (or "all") -> ("q_proj", "v_proj"), in the order of MODULES."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"] or names == ["all-linear"]:
        return DEFAULT_TARGETS
    fields = set()
    for n in names:
        field = n if n.endswith("_proj") else f"{n}_proj"
        if field not in MODULES:
            raise InvalidArgument(f"target module {n!r}: expected some of q, k, v, o, gate, up, down "
                                  "(or q_proj, ... or all)")
        fields.add(field)
    if not fields:
        raise InvalidArgument("no target modules given (expected some of q, k, v, o, gate, up, down)")
    return tuple(f for f in MODULES if f in fields)


def add_adapters(model, rank: int = 8, alpha: float = 16, targets=DEFAULT_TARGETS, seed: int = 0) -> int:
    """Wrap each target matrix of every block in a fresh LoRA adapter, initialised as PEFT does, in place.

    A is Kaiming-uniform with a = sqrt(5) (peft `tuners/lora/layer.py` reset_lora_parameters, which copies
    nn.Linear's own init): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(in). B is zero,
    so the adapted model starts exactly as the base model and the first gradient reaches B only (dL/dA is
    scale * B^T (...) = 0): training begins by moving B along directions A already spans.
    Returns the number of trainable weights.
    """
    if rank < 1:
        raise InvalidArgument(f"LoRA rank {rank}: expected a whole number >= 1")
    rng = np.random.default_rng(seed)
    count = 0
    for i, layer in enumerate(model.params.layers):
        for field in parse_targets(targets):
            base = getattr(layer, field)
            if base is None:  # Gemma 4: a KV-shared layer has no k/v_proj, a K=V layer no v_proj (nor has peft)
                continue
            if isinstance(base, LoRA):
                raise InvalidArgument(f"layer {i} {field} already has an adapter")
            out_features, in_features = base.shape
            bound = 1.0 / math.sqrt(in_features)
            A = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)  # (r, in)
            B = np.zeros((out_features, rank), np.float32)  # (out, r)
            setattr(layer, field, LoRA(base, A, B, alpha / rank))
            count += A.size + B.size
    return count


def adapters(params: Params) -> dict[tuple[int, str], LoRA]:
    """Every LoRA weight of the model, keyed by (layer, field)."""
    return {(i, f): getattr(layer, f) for i, layer in enumerate(params.layers) for f in MODULES
            if isinstance(getattr(layer, f), LoRA)}


def peft_key(layer: int, field: str, which: str) -> str:
    """PEFT's name of A or B: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"""
    return f"base_model.model.model.layers.{layer}.{MODULES[field]}.lora_{which}.weight"


# layers.{i}.{module path}.lora_{A|B}[.adapter name].weight, under the prefixes PEFT writes for a text model
# (base_model.model.model.) or for multimodal Gemma 3 (base_model.model.model.language_model. in
# transformers >= 4.52, base_model.model.language_model.model. before)
_KEY = re.compile(r"^base_model\.model\.(?:model\.(?:language_model\.)?|language_model\.model\.)layers\.(\d+)\."
                  r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_FIELD = {path: field for field, path in MODULES.items()}


# ---- writing ----------------------------------------------------------------------------------------------

@contextmanager
def new_directory(out: str | os.PathLike, overwrite: bool = False):
    """Write a whole directory or nothing: yield a temporary sibling to fill, then rename it to `out`.

    A Ctrl-C or a full disk while writing leaves `out` as it was. `out` must be absent or empty unless
    `overwrite` (then the old one is moved aside, the new one renamed in, the old one deleted: there is an
    instant with no `out`, never one with half of it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InvalidArgument(f"--out {out}: the folder is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def adapter_config(params: Params, base_model: str | None = None, dropout: float = 0.0) -> dict:
    """adapter_config.json for the model's adapters: the fields peft reads (peft `tuners/lora/config.py`
    LoraConfig); peft fills the rest with its defaults. Ranks or alphas that differ from the first adapter's
    go in rank_pattern / alpha_pattern under the full module name, which peft matches as a suffix."""
    found = adapters(params)
    if not found:
        raise InvalidArgument("the model has no LoRA adapters to save")
    (i0, f0), first = next(iter(found.items()))
    r = first.A.shape[0]
    alpha = first.scale * r
    rank_pattern, alpha_pattern = {}, {}
    for (i, field), w in found.items():
        name = f"model.layers.{i}.{MODULES[field]}"
        if w.A.shape[0] != r:
            rank_pattern[name] = int(w.A.shape[0])
        if not math.isclose(w.scale * w.A.shape[0], alpha, rel_tol=1e-6):
            alpha_pattern[name] = w.scale * w.A.shape[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(r), "lora_alpha": _number(alpha), "lora_dropout": dropout,
        "target_modules": sorted({f for _, f in found}), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _number(v) for k, v in alpha_pattern.items()}, "inference_mode": True,
    }


def _number(x: float):
    """16.0 -> 16 in JSON, as people write alphas."""
    return int(x) if float(x).is_integer() else float(x)


def write_adapter(directory: Path, params: Params, base_model: str | None = None, dropout: float = 0.0) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing (temporary) directory."""
    from safetensors.numpy import save_file

    config = adapter_config(params, base_model, dropout)
    tensors = {}
    for (i, field), w in adapters(params).items():
        tensors[peft_key(i, field, "A")] = np.ascontiguousarray(w.A, np.float32)
        tensors[peft_key(i, field, "B")] = np.ascontiguousarray(w.B, np.float32)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # "pt": peft reads it
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter(model, out: str | os.PathLike, overwrite: bool = False, dropout: float = 0.0) -> Path:
    """Save the model's adapters as a PEFT adapter folder (written whole, or not at all)."""
    with new_directory(out, overwrite) as tmp:
        write_adapter(tmp, model.params, model.source, dropout)
    return Path(out)


# ---- reading ----------------------------------------------------------------------------------------------

def read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelFileError(f"{directory}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    refuse = [("peft_type", config.get("peft_type", "LORA") != "LORA", "only LORA adapters are supported"),
              ("use_dora", bool(config.get("use_dora")), "DoRA is not supported"),
              ("bias", config.get("bias", "none") != "none", "only bias 'none' is supported"),
              ("modules_to_save", bool(config.get("modules_to_save")),
               "fully trained extra modules are not supported"),
              ("fan_in_fan_out", bool(config.get("fan_in_fan_out")), "Gemma's weights are (out, in)")]
    for key, bad, why in refuse:
        if bad:
            raise ModelFileError(f"{path}: {key} = {config[key]!r}: {why}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)) or config.get(key, 8) <= 0:
            raise ModelFileError(f"{path}: {key} = {config.get(key)!r}, expected a positive number")
    return config


def _alpha_for(module: str, config: dict) -> float:
    """lora_alpha of one module: alpha_pattern's entry whose key matches the end of the module name (peft
    `tuners/tuners_utils.py` get_pattern_key: re.match(rf"(.*\\.)?({key})$", name)), else lora_alpha."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(config.get("lora_alpha", 8))


def load_adapter(model, directory: str | os.PathLike) -> int:
    """Put a PEFT LoRA adapter (made here or by peft) onto the model's matrices, in place. Returns the number
    of adapted matrices. Every tensor is checked before anything changes: an unknown name, a missing
    partner, a layer the model lacks or a shape that does not fit is an error naming the tensor."""
    from .hf import SafetensorsFile

    directory = Path(directory)
    config = read_adapter_config(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelFileError(f"{directory}: no {ADAPTER_WEIGHTS} (adapters saved as .bin pickles are not read; "
                             "save them with safetensors)")
    file = SafetensorsFile(path)  # the header is validated against the file before anything is read
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for name in file.names():
        m = _KEY.match(name)
        if m is None:
            raise ModelFileError(f"{path}: tensor {name} is not a LoRA A/B of a Gemma block's q/k/v/o/gate/up/"
                                 "down projection")
        layer, field = int(m.group(1)), _FIELD[m.group(2)]
        if layer >= len(model.params.layers):
            raise ModelFileError(f"{path}: tensor {name} is for layer {layer}, but the model has "
                                 f"{len(model.params.layers)} layers")
        pairs.setdefault((layer, field), {})[m.group(3)] = name
    plan = []
    for (layer, field), names in sorted(pairs.items()):
        if set(names) != {"A", "B"}:
            have = next(iter(names.values()))
            raise ModelFileError(f"{path}: tensor {have} has no lora_{'B' if 'A' in names else 'A'} partner")
        base = getattr(model.params.layers[layer], field)
        if isinstance(base, LoRA):
            raise InvalidArgument(f"layer {layer} {field} already has an adapter")
        out_features, in_features = base.shape
        r = file.header[names["A"]]["shape"][0] if len(file.header[names["A"]]["shape"]) == 2 else -1
        for which, expected in (("A", (r, in_features)), ("B", (out_features, r))):
            shape = tuple(file.header[names[which]]["shape"])
            if shape != expected or r < 1:
                raise ModelFileError(f"{path}: tensor {names[which]} has shape {shape}, but this model's "
                                     f"{field} in layer {layer} needs {expected} (an adapter for another model?)")
        module = f"model.layers.{layer}.{MODULES[field]}"
        alpha = _alpha_for(module, config)
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead of alpha / r (peft update_layer)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        plan.append((layer, field, base, names, scale))
    if not plan:
        raise ModelFileError(f"{path}: holds no LoRA tensors")
    for layer, field, base, names, scale in plan:
        A = np.array(file.get(names["A"]), np.float32)  # copies: the adapter may be trained further
        B = np.array(file.get(names["B"]), np.float32)
        setattr(model.params.layers[layer], field, LoRA(base, A, B, scale))
    return len(plan)


# ---- folding in, and writing a Hugging Face directory ----------------------------------------------------

def merged_params(params: Params) -> Params:
    """The parameters with every adapter folded into its matrix, W + scale * B A, as float32 (what a
    Hugging Face checkpoint holds). Other matrices are dequantized to float32 too: an HF directory has no
    int8/int4 tensors. Every field is kept: Gemma 4's model-level per-layer embeddings as well, and its experts
    (a list of matrices, merged one by one). Builds new arrays; the model is unchanged."""
    def merge(w):
        if w is None or isinstance(w, np.ndarray) and w.ndim == 1:
            return w
        if isinstance(w, list):  # Gemma 4's experts: E matrices
            return [merge(m) for m in w]
        return np.ascontiguousarray(dequantize(w) if not isinstance(w, LoRA) else w.rows(0, w.shape[0]),
                                    np.float32)

    layers = [type(layer)(**{f: merge(w) for f, w in vars(layer).items()}) for layer in params.layers]
    top = {f: merge(w) for f, w in vars(params).items() if f != "layers"}
    return Params(layers=layers, **top)


def hf_config_dict(c: GemmaConfig) -> dict:
    """config.json for transformers, in its current style (rope_parameters, layer_types), from what
    minigemma knows of the model: every field GemmaConfig.from_hf_dict reads, so a GGUF-loaded model gets a
    complete config too."""
    def rope(layer_type):
        r = c.rope[layer_type]
        if r.partial_rotary_factor != 1.0:  # Gemma 4's global layers (config.py _read_rope reads these keys)
            return {"rope_type": "proportional", "rope_theta": r.theta,
                    "partial_rotary_factor": r.partial_rotary_factor,
                    **({"factor": r.factor} if r.factor != 1.0 else {})}
        if r.factor != 1.0:
            return {"rope_type": "linear", "rope_theta": r.theta, "factor": r.factor}
        return {"rope_type": "default", "rope_theta": r.theta}

    architecture = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM", "gemma4_text": "Gemma4ForCausalLM",
                    "vaultgemma": "VaultGemmaForCausalLM"}[c.model_type]
    d = {
        "architectures": [architecture], "model_type": c.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0],
        "pad_token_id": c.pad_token_id, "tie_word_embeddings": True, "dtype": "float32",
        "layer_types": list(c.layer_types),
        # Gemma 1 reads the activation from hidden_act, Gemma 2/3/4 from hidden_activation (config.py)
        ("hidden_act" if c.model_type == "gemma" else "hidden_activation"): "gelu_pytorch_tanh",
    }
    if c.model_type in ("gemma3_text", "gemma4_text"):
        d["rope_parameters"] = {FULL: rope(FULL), SLIDING: rope(SLIDING)}
    else:
        d["rope_parameters"] = rope(FULL)
    if c.model_type != "gemma":
        d.update(sliding_window=c.sliding_window, final_logit_softcapping=c.final_logit_softcapping)
    if c.model_type not in ("gemma", "gemma4_text"):  # Gemma 4 has no query scale (config.attn_scale)
        d["query_pre_attn_scalar"] = c.query_pre_attn_scalar
    if c.model_type in ("gemma2", "vaultgemma"):
        d["attn_logit_softcapping"] = c.attn_logit_softcapping
    if c.model_type == "gemma4_text":  # its own fields, as Gemma4TextConfig saves them (MoE ones null when off)
        moe = c.enable_moe_block
        d.update(per_layer_config={str(i): dict(v) for i, v in sorted(c.per_layer_config.items())},
                 attention_k_eq_v=c.attention_k_eq_v, hidden_size_per_layer_input=c.hidden_size_per_layer_input,
                 vocab_size_per_layer_input=c.vocab_size_per_layer_input,
                 num_kv_shared_layers=c.num_kv_shared_layers, use_double_wide_mlp=c.use_double_wide_mlp,
                 enable_moe_block=moe, num_experts=c.num_experts if moe else None,
                 top_k_experts=c.top_k_experts if moe else None,
                 moe_intermediate_size=c.moe_intermediate_size if moe else None)
    return d


def output_config(config: GemmaConfig, source: str | None = None) -> dict:
    """The config.json to write: the model's own, as read, when it came from one (every field the checkpoint's
    authors set is kept), with the dtype set to the float32 written here (transformers loads a checkpoint in
    the dtype its config names); otherwise, for a GGUF file, one built from what minigemma knows. A multimodal
    Gemma 3 config describes a model this folder does not hold (text weights only), so it is rebuilt too."""
    from_json = source is not None and (Path(source) / "config.json").is_file()
    if from_json and config.extra.get("model_type") == config.model_type:
        d = dict(config.extra)
        d.pop("torch_dtype", None)
        d["dtype"] = "float32"
        return d
    return hf_config_dict(config)


def write_hf_directory(directory: Path, config: GemmaConfig, params: Params, tokenizer=None,
                       source: str | None = None) -> None:
    """config.json + model.safetensors (float32, transformers' tensor names from params.MODEL_TENSORS and
    LAYER_TENSORS) and, when there is one, the tokenizer, into an existing (temporary) directory. Each tensor
    is written as transformers stores it (_as_stored), so loading the folder gives back these params."""
    from safetensors.numpy import save_file

    tensors = {}
    for spec in model_specs(config):
        tensors[spec.hf] = _as_stored(config, spec, getattr(params, spec.field))
    for i, layer in enumerate(params.layers):
        for spec in layer_specs(config, i):
            tensors[LAYER_PREFIX["hf"].format(i) + spec.hf] = _as_stored(config, spec, getattr(layer, spec.field))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(output_config(config, source), indent=2) + "\n")
    source_tokenizer = Path(source) / "tokenizer.model" if source and Path(source).is_dir() else None
    if source_tokenizer is not None and source_tokenizer.is_file():
        shutil.copyfile(source_tokenizer, directory / "tokenizer.model")
    elif tokenizer is not None:
        # A GGUF's vocabulary, as the SentencePiece model minigemma rebuilt from it (tokenizer.py)
        (directory / "tokenizer.model").write_bytes(tokenizer._sp.serialized_model_proto())
    if (directory / "tokenizer.model").exists():  # transformers adds <bos> only when told (Gemma's own file)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")


def _as_stored(config: GemmaConfig, spec, w) -> np.ndarray:
    """One field as a transformers checkpoint stores it: what params.build_params undoes on load, done again.

    Float32. Gemma 4's experts (a list of E matrices here) stacked back into one (E, out, in) tensor. Norm
    gains: minigemma holds them zero-centred, multiplying by (1 + w); Gemma 1-3 files store that w (a GGUF's +1
    was undone on load), Gemma 4 files the whole multiplier (config.norm_gain_is_w), so there the 1 goes back
    on. A loaded gain, w = float32(s - 1), comes back bit for bit through float32(w + 1) and the next load's
    - 1 (tests/test_lora.py checks); a trained one may lose the low bits of a small w (finetune.py keeps it)."""
    if spec.stacked:
        return np.ascontiguousarray(np.stack([_float32(m) for m in w]))  # E x (out, in) -> (E, out, in)
    w = _float32(w)
    if stores_full_gain(config, spec, "hf"):  # the loader's rule, undone
        w = w + np.float32(1.0)
    return np.ascontiguousarray(w)


def _float32(w) -> np.ndarray:
    return w if isinstance(w, np.ndarray) and w.dtype == np.float32 else dequantize(w).astype(np.float32)


def save_merged(model, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model with its adapters folded in as a Hugging Face directory (written whole, or not at all)."""
    params = merged_params(model.params)
    with new_directory(out, overwrite) as tmp:
        write_hf_directory(tmp, model.config, params, model._tokenizer, model.source)
    return Path(out)
