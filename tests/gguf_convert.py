"""A small HF -> GGUF converter for tiny test models, written the way llama.cpp's `convert_hf_to_gguf.py` does it
for the architectures `gemma`, `gemma2` and `gemma3` (classes GemmaModel, Gemma2Model, Gemma3Model there).

It is a test oracle, so it must not borrow minigemma's own name table (that would make the GGUF tests circular):
tensor names come from the gguf package's `get_tensor_name_map`, the HF -> GGUF mapping llama.cpp itself uses.
What it copies from llama.cpp's converter:
  * metadata: context/embedding/feed-forward length, block count, head counts, RMS eps, key/value length (= head_dim);
    Gemma 2 adds both soft-caps and the sliding window; Gemma 3 the global RoPE base, the sliding window and a
    linear RoPE scaling (type + factor) when the model has one;
  * 1.0 is added to every "*norm.weight" (llama.cpp's RMSNorm is a plain x*w, Gemma's is x*(1+w));
  * lm_head is skipped (tied to the embedding);
  * 1-D tensors (the norms) stay F32 whatever the file type; matrices take the chosen type.
What llama.cpp hard-codes instead of storing (layer pattern, Gemma 3's local RoPE base 10000,
query_pre_attn_scalar = head_dim, or D/H on the 27B models) can't be written, so `convert` refuses a model that
differs there: such a GGUF would silently describe another model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}  # HF model_type -> GGUF architecture
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
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"gguf has no name for {hf_name}")
        names[hf_name] = gguf_name
    return names


def check_expressible(config) -> None:
    """Refuse a model whose hard-coded-by-llama.cpp values differ from llama.cpp's (see the module docstring)."""
    n, kind = config.num_hidden_layers, config.model_type
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
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
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
        if hf_name.endswith("norm.weight"):
            data = data + np.float32(1.0)  # llama.cpp: `data_torch = data_torch + 1` (Gemma 3: norm_shift)
        write_tensor(writer, gguf_name, data, Q.F32 if data.ndim <= 1 else qtype)
    for gguf_name, data in (extra or {}).items():
        write_tensor(writer, gguf_name, np.asarray(data, np.float32), Q.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    hf_name = {g: h for h, g in names.items()}
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith("norm.weight"):
            array = array - np.float32(1.0)
        out[hf_name[t.name]] = np.ascontiguousarray(array)
    return out
