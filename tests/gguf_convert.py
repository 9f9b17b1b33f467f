"""A small HF -> GGUF converter for tiny test models, written the way llama.cpp's `convert_hf_to_gguf.py` does it
for the architectures `gemma`, `gemma2`, `gemma3` and `gemma4` (classes GemmaModel, Gemma2Model, Gemma3Model,
Gemma4Model in its conversion/gemma.py).

It is a test oracle, so it must not borrow minigemma's own name table (that would make the GGUF tests circular):
tensor names come from the gguf package's `get_tensor_name_map`, the HF -> GGUF mapping llama.cpp itself uses.
What it copies from llama.cpp's converter:
  * metadata: context/embedding/feed-forward length, block count, head counts, RMS eps, key/value length (= head_dim);
    Gemma 2 adds both soft-caps and the sliding window; Gemma 3 the global RoPE base, the sliding window and a
    linear RoPE scaling (type + factor) when the model has one;
  * 1.0 is added to every "*norm.weight" (llama.cpp's RMSNorm is a plain x*w, Gemma's is x*(1+w));
  * lm_head is skipped (tied to the embedding);
  * 1-D tensors (the norms) stay F32 whatever the file type; matrices take the chosen type.
Gemma 4 (Gemma4Model, read in the llama-cpp-python 0.3.36 source distribution) differs: no norm shift (its norms
already multiply by w); per-layer arrays for head_count_kv (when global layers have their own kv-head count)
and feed_forward_length (when KV-shared layers have a double-wide MLP); a bool per layer for the sliding-window
pattern; key_length for the global head dim and key_length_swa for the sliding one; the router's scale and
per-expert scale under names of their own; and a `rope_freqs` tensor of frequency factors (1.0 for the pairs
the proportional RoPE rotates, 1e30 for the rest). Its vocabulary is a BPE one (tokenizer.ggml.model "gemma4",
which minigemma does not read): written here as pieces, scores and types only, without the merges.
What llama.cpp hard-codes instead of storing (layer pattern, Gemma 3's local RoPE base 10000,
query_pre_attn_scalar = head_dim, or D/H on the 27B models) can't be written, so `convert` refuses a model that
differs there: such a GGUF would silently describe another model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
        "gemma4_text": "gemma4"}  # HF model_type -> GGUF architecture
# Gemma4Model.modify_tensors: names of their own for the router's two scales (suffix after "blk.{i}.")
GEMMA4_SPECIAL = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}
FILE_TYPE = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
             Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_names(model) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf's own map (lm_head left out: Gemma ties it)."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == ARCH[model.config.model_type])
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight":
            continue
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        if rest in GEMMA4_SPECIAL:
            names[hf_name] = f"blk.{layer}.{GEMMA4_SPECIAL[rest]}"
            continue
        name = hf_name
        if name.endswith("layer_scalar") or ".experts." in name:  # Gemma4Model.filter_tensors appends ".weight"
            name += ".weight"
        gguf_name = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"gguf has no name for {hf_name}")
        names[hf_name] = gguf_name
    return names


def check_expressible(config) -> None:
    """Refuse a model whose hard-coded-by-llama.cpp values differ from llama.cpp's (see the module docstring)."""
    n, kind = config.num_hidden_layers, config.model_type
    if kind == "gemma4_text":  # Gemma4Model asserts a proportional RoPE on global layers; sliding ones are default
        assert config.rope_parameters["full_attention"]["rope_type"] == "proportional"
        assert config.rope_parameters["sliding_attention"].get("rope_type", "default") == "default"
        return
    if kind != "gemma3_text":
        assert config.rope_parameters["rope_theta"] == 10_000.0, "GemmaModel/Gemma2Model write no RoPE base"
        assert config.rope_parameters.get("rope_type", "default") == "default"
    if kind == "gemma":
        return
    pattern = 2 if kind == "gemma2" else 6  # llama.cpp: set_swa_pattern(2) / set_swa_pattern(6)
    expected = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    assert list(config.layer_types) == expected, f"{kind}: layer_types {config.layer_types} are not llama.cpp's"
    # llama.cpp scales queries by 1/sqrt(head_dim), except on the 27B models, which it knows by their layer
    # count (46 for Gemma 2, 62 for Gemma 3) and scales by 1/sqrt(D/H)
    is_27b = (kind, n) in (("gemma2", 46), ("gemma3_text", 62))
    scalar = config.hidden_size // config.num_attention_heads if is_27b else config.head_dim
    assert config.query_pre_attn_scalar == scalar, f"llama.cpp assumes query_pre_attn_scalar = {scalar}"
    if kind == "gemma3_text":
        assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0, "llama.cpp: local base 1e4"
        assert config.rope_parameters["sliding_attention"].get("rope_type", "default") == "default"


def vocabulary(n: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal Gemma-shaped SentencePiece vocabulary of exactly n pieces: <pad> <eos> <bos> <unk>, the 256
    byte-fallback pieces (Gemma's tokenizer has byte_fallback, and SentencePiece refuses to load one without all
    256), then "▁", letters and letter pairs as normal pieces with falling scores."""
    T = gguf.TokenType
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN] + [T.BYTE] * 256
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    normal = ["\u2581"] + letters + ["\u2581" + a for a in letters] + [a + b for a in letters for b in letters]
    if n < len(pieces) + 1:
        raise ValueError(f"a loadable Gemma vocabulary needs at least {len(pieces) + 1} pieces, not {n}")
    normal = normal[: n - len(pieces)]
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(normal))]
    return pieces + normal, scores, [int(t) for t in types] + [int(T.NORMAL)] * len(normal)


def convert(model, path: Path, qtype: Q = Q.F32, *, arch: str | None = None, tokenizer: bool = True,
            vocab: tuple[list, list, list] | None = None, unk_id: int | None = 3,
            drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write a transformers Gemma model as a GGUF file, as llama.cpp's converter would.

    The keyword arguments spoil the file on purpose for the error tests: `arch` writes another architecture
    name (metadata keys follow it), `tokenizer=False` leaves out the vocabulary, `vocab` replaces it by
    (pieces, scores, types), `unk_id=None` leaves out the <unk> id, `drop` leaves out GGUF tensors by name,
    `extra` adds float32 tensors by GGUF name.
    """
    c = model.config
    check_expressible(c)
    writer = gguf.GGUFWriter(path, arch or ARCH[c.model_type])
    writer.add_name("tiny-" + c.model_type)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    hparams = c.to_dict()  # as config.json: Gemma 4's per-layer head_dim is ambiguous on the config object
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(FILE_TYPE[qtype])
    if c.model_type == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    if c.model_type == "gemma3_text":
        full = c.rope_parameters["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])  # global layers; the local base is hard-coded
        writer.add_sliding_window(c.sliding_window)
        if full.get("rope_type", "default") != "default":
            assert full["rope_type"] == "linear", "llama.cpp's Gemma3Model only converts linear scaling"
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)  # "only applied for global layers"
            writer.add_rope_scaling_factor(full["factor"])

    if c.model_type == "gemma4_text":
        gemma4_metadata(writer, model)
        if tokenizer:  # Gemma4Model.set_vocab: a BPE vocabulary (the merges are left out here)
            pieces, scores, types = vocab or ([f"t{i}" for i in range(c.vocab_size)], [0.0] * c.vocab_size,
                                              [int(gguf.TokenType.NORMAL)] * c.vocab_size)
            writer.add_tokenizer_model("gemma4")
            writer.add_token_list(pieces)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(False)
            writer.add_add_bos_token(True)
        tokenizer = False

    if tokenizer:  # llama.cpp: _set_vocab_sentencepiece() + add_add_space_prefix(False)
        pieces, scores, types = vocab or vocabulary(c.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(c.bos_token_id)
        writer.add_eos_token_id(c.eos_token_id if isinstance(c.eos_token_id, int) else c.eos_token_id[0])
        if unk_id is not None:
            writer.add_unk_token_id(unk_id)
        writer.add_pad_token_id(c.pad_token_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)

    state = model.state_dict()
    for hf_name, gguf_name in gguf_names(model).items():
        if gguf_name in drop:
            continue
        data = state[hf_name].detach().to("cpu").float().numpy()
        if hf_name.endswith("norm.weight") and c.model_type != "gemma4_text":
            data = data + np.float32(1.0)  # llama.cpp: `data_torch = data_torch + 1` (Gemma 3: norm_shift)
        write_tensor(writer, gguf_name, data, Q.F32 if data.ndim <= 1 else qtype)
    if c.model_type == "gemma4_text" and "rope_freqs.weight" not in drop:  # Gemma4Model.generate_extra_tensors
        full = c.rope_parameters["full_attention"]
        head_dim_full = global_head_dim(model)
        rotated = int(head_dim_full * full["partial_rotary_factor"] / 2)
        factors = [1.0] * rotated + [1e30] * (head_dim_full // 2 - rotated)
        write_tensor(writer, "rope_freqs.weight", np.array(factors, np.float32), Q.F32)
    for gguf_name, data in (extra or {}).items():
        write_tensor(writer, gguf_name, np.asarray(data, np.float32), Q.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def global_head_dim(model) -> int:
    """As Gemma4Model finds it: global_head_dim, else the head_dim of the first full layer in per_layer_config."""
    hparams = model.config.to_dict()
    for layer, overrides in (hparams.get("per_layer_config") or {}).items():
        if hparams["layer_types"][int(layer)] == "full_attention" and "head_dim" in overrides:
            return overrides["head_dim"]
    return hparams["head_dim"]


def gemma4_metadata(writer, model) -> None:
    """The keys Gemma4Model.set_gguf_parameters writes over Gemma3Model's (later writes win there too)."""
    c, hparams = model.config, model.config.to_dict()
    n, shared = c.num_hidden_layers, c.num_kv_shared_layers
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input or 0)
    swa = [t == "sliding_attention" for t in c.layer_types]
    writer.add_sliding_window_pattern(swa)
    writer.add_sliding_window(c.sliding_window)
    head_dim_full = global_head_dim(model)
    writer.add_key_length(head_dim_full)
    writer.add_value_length(head_dim_full)
    writer.add_key_length_swa(hparams["head_dim"])
    writer.add_value_length_swa(hparams["head_dim"])
    if c.use_double_wide_mlp:
        writer.add_feed_forward_length([c.intermediate_size * (1 if i < n - shared else 2) for i in range(n)])
    kv_full = next((o["num_key_value_heads"] for i, o in (hparams.get("per_layer_config") or {}).items()
                    if c.layer_types[int(i)] == "full_attention" and "num_key_value_heads" in o), None)
    if kv_full is not None:
        writer.add_head_count_kv([hparams["num_key_value_heads"] if s else kv_full for s in swa])
    writer.add_rope_dimension_count(head_dim_full)  # "proportional" is in rope_freqs
    writer.add_rope_dimension_count_swa(hparams["head_dim"])
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
    if c.final_logit_softcapping:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.enable_moe_block:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.top_k_experts)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)


def write_tensor(writer, name: str, data: np.ndarray, qtype: Q) -> None:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in (Q.F32, Q.F16):  # plain floats: the writer takes the type from the NumPy dtype
        writer.add_tensor(name, gguf.quants.quantize(data, qtype))
    else:  # BF16 and block types are raw bytes (rows, bytes per row); the writer derives the element shape
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def dequantized(path: Path, names: dict[str, str]) -> dict[str, np.ndarray]:
    """A GGUF file's tensors back as HF-named float32 arrays, by gguf's own dequantizer, with the norm +1 undone
    in float32: the exact weights a correct GGUF loader must compute with."""
    reader = gguf.GGUFReader(path)
    shifted = bytes(reader.fields["general.architecture"].parts[-1]).decode() != "gemma4"  # Gemma 4: no +1
    hf_name = {g: h for h, g in names.items()}
    out = {}
    for t in reader.tensors:
        if t.name not in hf_name:  # rope_freqs: no transformers tensor
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith("norm.weight") and shifted:
            array = array - np.float32(1.0)
        out[hf_name[t.name]] = np.ascontiguousarray(array)
    return out
