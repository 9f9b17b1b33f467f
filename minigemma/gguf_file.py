"""Load a GGUF file written by llama.cpp's converter (architectures gemma, gemma2, gemma3).

GGUF holds the weights (often block-quantized), the tokenizer vocabulary and some of the hyper-parameters.
Three things need care (llama.cpp conversion/gemma.py and src/llama-model.cpp):
  * every "*norm.weight" was stored with 1.0 already added, because llama.cpp's RMSNorm is a plain x*w;
    our rms_norm multiplies by (1 + w), so we subtract the 1 again (transformers' GGUF loader does the same:
    Gemma2TensorProcessor, `weights - 1`);
  * the metadata omits query_pre_attn_scalar, the local RoPE base and the sliding-window pattern; llama.cpp
    hard-codes them and so do we (below);
  * dims are listed fastest-first, so a tensor's NumPy shape is the reverse of its GGUF shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import GemmaConfig
from .params import Params, build_params
from .quants import SUPPORTED_TYPES, dequantize
from .weights import Float16Bits, Int4, Int8, StoredTensor, release_pages

ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def open_gguf(path: Path):
    """The gguf package's reader, with one speed-up (below)."""
    import gguf  # imported here: it is only needed for GGUF files

    class Reader(gguf.GGUFReader):
        # GGUFReader slices its np.memmap about three million times to parse a 262k-token vocabulary, and
        # every slice of the memmap subclass pays for __array_finalize__. A plain ndarray view of the same
        # map (still no copy) parses about 3x faster: ~6 s -> ~2 s for the built-in model.
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    try:
        return Reader(path)
    except Exception as e:  # the reader raises ValueError/struct errors of many kinds on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: Path) -> GemmaConfig:
    """Translate GGUF metadata into a config.json-style dict and read that like any config.json, so every
    derived value (layer types, attention scale, RoPE per layer type) comes from config.py as for HF files."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not a Gemma text model "
                         f"(expected one of {', '.join(ARCHITECTURES)})")

    def meta(key):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: metadata {arch}.{key} is missing")
        return value

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    D, H, n = int(meta("embedding_length")), int(meta("attention.head_count")), int(meta("block_count"))
    # What the file holds, under config.json's names. A key the file leaves out is left out here too, so
    # GemmaConfig.from_hf_dict fills it with transformers' default for the model type: one place owns defaults.
    optional = {"context_length": "max_position_embeddings", "rope.freq_base": "rope_theta",
                # stored as float32 (9.99999997e-07 for 1e-6): the same number once we compute in float32
                "attention.layer_norm_rms_epsilon": "rms_norm_eps"}
    hf = {hf_key: field(reader, f"{arch}.{key}") for key, hf_key in optional.items()
          if field(reader, f"{arch}.{key}") is not None}
    tokens = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}
    hf.update({hf_key: int(field(reader, f"tokenizer.ggml.{key}")) for key, hf_key in tokens.items()
               if field(reader, f"tokenizer.ggml.{key}") is not None})
    hf.update({
        "model_type": {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[arch],
        "vocab_size": int(embed.shape[1]),  # GGUF lists token_embd as (D, V), fastest dim first
        "hidden_size": D,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": n,
        "num_attention_heads": H,
        # llama.cpp's defaults when these are absent (llama-model.cpp: n_head_kv = n_head, n_embd_head_k =
        # n_embd / n_head); transformers' per-type defaults would describe another model size
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv") or H),
        "head_dim": int(field(reader, f"{arch}.attention.key_length") or D // H),
    })
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
    if scaling == "linear":  # config.py applies it to Gemma 3's global layers only, as llama.cpp does
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}

    # Gemma 2's window and soft-caps, Gemma 3's window, when the file has them (if not, transformers' Gemma 2
    # defaults 4096, 50 and 30 are also the values llama.cpp assumes)
    for key, hf_key in (("attention.sliding_window", "sliding_window"),
                        ("attn_logit_softcapping", "attn_logit_softcapping"),
                        ("final_logit_softcapping", "final_logit_softcapping")):
        if arch != "gemma" and field(reader, f"{arch}.{key}") is not None:
            hf[hf_key] = field(reader, f"{arch}.{key}")

    # What GGUF does not store, llama.cpp hard-codes (src/llama-model.cpp), and so do we:
    #  - the layer pattern: Gemma 2 alternates sliding/global from layer 0 (set_swa_pattern(2), also
    #    config.py's legacy default for gemma2); Gemma 3 has every 6th layer global (set_swa_pattern(6));
    #  - Gemma 3's sliding layers use RoPE base 10000 (rope_freq_base_train_swa);
    #  - the attention scale: 1/sqrt(head_dim), except on the 27B models, 1/sqrt(D/H), which llama.cpp
    #    recognises by layer count (46 for Gemma 2 27B, 62 for Gemma 3 27B).
    if arch != "gemma":
        is_27b = (arch, n) in (("gemma2", 46), ("gemma3", 62))
        hf["query_pre_attn_scalar"] = D // H if is_27b else hf["head_dim"]
    if arch == "gemma3":
        meta("attention.sliding_window")  # required: Gemma 3 GGUF files always carry it
        hf["sliding_window_pattern"] = 6
        hf["rope_local_base_freq"] = 10_000.0
    try:
        return GemmaConfig.from_hf_dict(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class GGUFTensor(StoredTensor):
    """One tensor of a GGUF file, read on demand (weights.StoredTensor).

    Its bytes are a view of the memory-mapped file, one row of blocks per matrix row, so a block of rows is
    a slice. Every "*norm.weight" holds 1 + w (llama.cpp's converter): read() subtracts the 1 again."""

    def __init__(self, t):
        self.t, self.type = t, SUPPORTED_TYPES.get(int(t.tensor_type), str(int(t.tensor_type)))
        self.shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF dims are fastest-first

    def read(self) -> np.ndarray:
        array = dequantize(self.t.data, self.t.tensor_type, self.shape)
        if self.t.name.endswith("norm.weight"):
            array = array - np.float32(1.0)  # the converter stored 1 + w; rms_norm adds the 1 itself
        return array

    def rows(self, start: int, stop: int) -> np.ndarray:
        view = self.t.data[start:stop]
        block = dequantize(view, self.t.tensor_type, (stop - start,) + self.shape[1:])
        release_pages(view)  # converted once: the file's pages need not stay in this process's memory
        return block

    def stored(self, kind: str):
        # Q8_0 *is* our int8 and Q4_1 our int4, byte for byte: used in place, with no copy and no requantizing
        if (kind, self.type) == ("int8", "Q8_0"):
            return Int8.from_q8_0(self.t.data, self.shape)
        if (kind, self.type) == ("int4", "Q4_1"):
            return Int4.from_q4_1(self.t.data, self.shape)
        if (kind, self.type) == ("float16", "F16"):
            return Float16Bits(self.t.data, "float16")
        if (kind, self.type) == ("bfloat16", "BF16"):
            return Float16Bits(self.t.data.view(np.uint16), "bfloat16")
        return None


def load_gguf_params(reader, config: GemmaConfig, path: Path, progress: bool = True, quantize: str | None = None,
                     dtype: str | None = None) -> Params:
    """Read every tensor named in params.LAYER_TENSORS into its storage (float32 by default), one at a time.

    Tensors of another type than the chosen one (Q4_K, Q5_0, Q6_K, ...) are dequantized a block of rows at a
    time and requantized; with no `quantize` nor `dtype` each is dequantized to float32, the reference."""
    bar = tqdm(total=len(reader.tensors), desc=f"loading {path.name}", unit="tensor", disable=not progress,
               leave=False)
    try:
        # an "output.weight" would be an untied head: Gemma ties it and llama.cpp's converter skips it
        return build_params(config, {t.name: GGUFTensor(t) for t in reader.tensors}, "gguf", str(path),
                            quantize=quantize, dtype=dtype, done=bar.update)
    finally:
        bar.close()
