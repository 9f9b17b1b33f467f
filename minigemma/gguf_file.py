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

import math
import struct
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import GemmaConfig
from .errors import ModelFileError
from .params import Params, build_params
from .quants import SUPPORTED_TYPES, dequantize
from .weights import Float16Bits, Int4, Int8, StoredTensor, release_pages

ARCHITECTURES = ("gemma", "gemma2", "gemma3")


# GGUF metadata value types (gguf constants.py GGUFValueType) -> size in bytes of a scalar; 8 STRING and
# 9 ARRAY have a length prefix instead.
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h


class _HeaderReader:
    """Reads a GGUF header front to back from an open file, checking every length against the bytes the file
    still has before reading it, so a count of 10^18 fails at once instead of allocating or looping."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def fail(self, what: str):
        raise ModelFileError(f"{self.path}: not a valid GGUF file ({what}, at byte {self.f.tell()} of {self.size})")

    def need(self, n: int, what: str):
        if n > self.size - self.f.tell():
            self.fail(f"{what} needs {n} bytes, the file has {self.size - self.f.tell()} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        return struct.unpack(fmt, self.f.read(n))

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        try:
            return self.f.read(n).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def skip_value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALAR_SIZE:
            self.need(_SCALAR_SIZE[kind], what)
            self.f.seek(_SCALAR_SIZE[kind], 1)
        elif kind == _STRING:
            (n,) = self.unpack("<Q", f"the length of {what}")
            self.need(n, what)
            self.f.seek(n, 1)
        elif kind == _ARRAY and depth == 0:  # arrays of arrays exist in the spec, never in a model file
            item, n = self.unpack("<IQ", f"the item type and length of {what}")
            if item in _SCALAR_SIZE:
                self.need(n * _SCALAR_SIZE[item], f"{what} ({n} items)")
                self.f.seek(n * _SCALAR_SIZE[item], 1)
            else:
                self.need(n * 8, f"{what} ({n} items)")  # every string or array item has an 8-byte length
                for _ in range(n):
                    self.skip_value(item, what, depth + 1)
        else:
            self.fail(f"{what} has value type {kind}, expected 0..12 (or an array of arrays)")


def check_gguf_header(path: Path) -> None:
    """Validate a GGUF file's header against the file before the gguf reader maps or allocates anything.

    The gguf package's GGUFReader trusts the header: a metadata array claiming 10^18 items makes it loop
    (reading nothing past the end of the map) and grow lists without end. So first, in one pass over the
    header (layout in docs/formats.md; llama.cpp ggml/src/gguf.cpp gguf_init_from_file does the same checks):
    magic and version; counts that the file can hold; every string and array length within the file; known
    value types; a power-of-two general.alignment; for each tensor at most 4 dims, a known ggml type with
    whole blocks, an aligned offset, and bytes that lie inside the file and overlap no other tensor's.
    """
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _HeaderReader(f, size, path)
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        (version,) = r.unpack("<I", "the version")
        if version not in (2, 3):
            r.fail(f"version {version}; only versions 2 and 3, little-endian, are supported")
        n_tensors, n_kv = r.unpack("<QQ", "the tensor and metadata counts")
        r.need(n_kv * 13, f"{n_kv} metadata entries")  # at least key length 8 + type 4 + a 1-byte value
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        keys = set()
        for _ in range(n_kv):
            key = r.string("a metadata key")
            if key in keys:
                r.fail(f"metadata {key} appears twice")
            keys.add(key)
            (kind,) = r.unpack("<I", f"the type of metadata {key}")
            if key == "general.alignment":
                if kind != _UINT32:
                    r.fail(f"general.alignment has value type {kind}, expected uint32 ({_UINT32})")
                (alignment,) = r.unpack("<I", key)
                if alignment == 0 or alignment & (alignment - 1):
                    r.fail(f"general.alignment is {alignment}, expected a power of two")
            else:
                r.skip_value(kind, f"metadata {key}")

        r.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length 8, n_dims 4, type 4, offset 8
        infos = []
        for _ in range(n_tensors):
            name = r.string("a tensor name")
            (n_dims,) = r.unpack("<I", f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                r.fail(f"tensor {name} has {n_dims} dims, expected 1..{MAX_DIMS}")
            dims = r.unpack(f"<{n_dims}Q", f"the dims of tensor {name}")
            kind, offset = r.unpack("<IQ", f"the type and offset of tensor {name}")
            infos.append((name, dims, kind, offset))
        data_start = -(-f.tell() // alignment) * alignment  # tensor data begins at the next aligned byte

    seen, spans = set(), []
    for name, dims, kind, offset in infos:
        where = f"{path}: tensor {name}"
        if name in seen:
            raise ModelFileError(f"{where} appears twice")
        seen.add(name)
        if kind not in set(map(int, gguf.GGML_QUANT_SIZES)):
            raise ModelFileError(f"{where} has unknown ggml type {kind}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        if dims[0] % block:
            raise ModelFileError(f"{where}: row length {dims[0]} is not a multiple of its block size {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment:
            raise ModelFileError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise ModelFileError(f"{where}: its {nbytes} bytes at offset {offset} run past the end of the file "
                                 f"({size - data_start} bytes of tensor data)")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelFileError(f"{path}: tensors {name} and {other} overlap")


def open_gguf(path: Path):
    """The gguf package's reader, with one speed-up (below), on a file whose header was checked first."""
    import gguf  # imported here: it is only needed for GGUF files

    check_gguf_header(path)

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
    except Exception as e:  # the reader raises ValueError/KeyError/struct errors of many kinds on bad files
        raise ModelFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


_NUMBERS = {0, 1, 2, 3, 4, 5, 6, 10, 11, 12}  # GGUFValueType ids of the integer and float scalars


def number(reader, key: str, path: Path, default=None, positive: bool = True):
    """A numeric metadata value, or a ModelFileError naming the field if it is a string, an array or <= 0."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if len(f.types) != 1 or int(f.types[0]) not in _NUMBERS:
        raise ModelFileError(f"{path}: metadata {key} is a {'/'.join(t.name for t in f.types)}, expected a number")
    value = f.contents()
    if positive and not value > 0:  # also catches NaN
        raise ModelFileError(f"{path}: metadata {key} is {value}, expected a positive number")
    return value


def config_from_gguf(reader, path: Path) -> GemmaConfig:
    """Translate GGUF metadata into a config.json-style dict and read that like any config.json, so every
    derived value (layer types, attention scale, RoPE per layer type) comes from config.py as for HF files."""
    arch = field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelFileError(f"{path}: architecture {arch!r} is not a Gemma text model "
                         f"(expected one of {', '.join(ARCHITECTURES)})")

    def meta(key):
        value = number(reader, f"{arch}.{key}", path)
        if value is None:
            raise ModelFileError(f"{path}: metadata {arch}.{key} is missing")
        return value

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None or len(embed.shape) != 2:
        raise ModelFileError(f"{path}: tensor token_embd.weight is missing (or not 2-D)")
    D, H, n = int(meta("embedding_length")), int(meta("attention.head_count")), int(meta("block_count"))
    # What the file holds, under config.json's names. A key the file leaves out is left out here too, so
    # GemmaConfig.from_hf_dict fills it with transformers' default for the model type: one place owns defaults.
    optional = {"context_length": "max_position_embeddings", "rope.freq_base": "rope_theta",
                # stored as float32 (9.99999997e-07 for 1e-6): the same number once we compute in float32
                "attention.layer_norm_rms_epsilon": "rms_norm_eps"}
    hf = {hf_key: number(reader, f"{arch}.{key}", path) for key, hf_key in optional.items()
          if field(reader, f"{arch}.{key}") is not None}
    tokens = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}
    hf.update({hf_key: int(number(reader, f"tokenizer.ggml.{key}", path, positive=False))
               for key, hf_key in tokens.items()
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
        "num_key_value_heads": int(number(reader, f"{arch}.attention.head_count_kv", path) or H),
        "head_dim": int(number(reader, f"{arch}.attention.key_length", path) or D // H),
    })
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if not isinstance(scaling, (str, type(None))) or scaling not in (None, "none", "linear"):
        raise ModelFileError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
    if scaling == "linear":  # config.py applies it to Gemma 3's global layers only, as llama.cpp does
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}

    # Gemma 2's window and soft-caps, Gemma 3's window, when the file has them (if not, transformers' Gemma 2
    # defaults 4096, 50 and 30 are also the values llama.cpp assumes)
    for key, hf_key in (("attention.sliding_window", "sliding_window"),
                        ("attn_logit_softcapping", "attn_logit_softcapping"),
                        ("final_logit_softcapping", "final_logit_softcapping")):
        if arch != "gemma" and field(reader, f"{arch}.{key}") is not None:
            hf[hf_key] = number(reader, f"{arch}.{key}", path)

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
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:  # values of the wrong kind or range
        raise ModelFileError(f"{path}: {e}") from None


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
