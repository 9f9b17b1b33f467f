"""Load a GGUF file written by llama.cpp's converter (architectures gemma, gemma2, gemma3, gemma4).

GGUF holds the weights (often block-quantized), the tokenizer vocabulary and some of the hyper-parameters.
Three things need care (llama.cpp conversion/gemma.py and src/llama-model.cpp):
  * every "*norm.weight" was stored with 1.0 already added, because llama.cpp's RMSNorm is a plain x*w;
    our rms_norm multiplies by (1 + w), so we subtract the 1 again (transformers' GGUF loader does the same:
    Gemma2TensorProcessor, `weights - 1`);
  * the metadata omits query_pre_attn_scalar, the local RoPE base and the sliding-window pattern; llama.cpp
    hard-codes them and so do we (below);
  * dims are listed fastest-first, so a tensor's NumPy shape is the reverse of its GGUF shape.
Gemma 4 (llama.cpp conversion/gemma.py Gemma4Model) differs: its norms are stored as they are (its RMSNorm
already multiplies by w), per-layer values are arrays (head_count_kv, feed_forward_length, the sliding-window
pattern), and the proportional RoPE of its global layers is a tensor, rope_freqs (below).
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import GemmaConfig
from .errors import ModelFileError
from .params import GGUF_IGNORED, Params, build_params
from .quants import SUPPORTED_TYPES, dequantize, symmetric_levels
from .packed import release_pages
from .weights import Float16Bits, Int4, Int8, StoredTensor

ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma4")
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}


# GGUF metadata value types (gguf constants.py GGUFValueType): id -> (name, struct format of a scalar);
# 8 STRING and 9 ARRAY have a length prefix instead.
_SCALARS = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
            5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 10: ("UINT64", "Q"), 11: ("INT64", "q"),
            12: ("FLOAT64", "d")}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_TYPE_NAMES = {**{k: name for k, (name, _) in _SCALARS.items()}, _STRING: "STRING", _ARRAY: "ARRAY"}
MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h
DEFAULT_ALIGNMENT = 32  # general.alignment when the file does not set it (GGUF spec)


class _HeaderReader:
    """Reads a GGUF header front to back from a buffer over the file, checking every length against the bytes
    the file still has before reading it, so a count of 10^18 fails at once instead of allocating or looping."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise ModelFileError(f"{self.path}: not a valid GGUF file ({what}, at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str):
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes, the file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        try:
            text = str(self.buf[self.pos:self.pos + n], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")
        self.pos += n
        return text

    def value(self, kind: int, what: str) -> tuple[object, list[int]]:
        """One metadata value (a number, a bool, a str, or for ARRAY a list of them) and its value types:
        [kind], or [ARRAY, item kind]."""
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind][1], what)[0], [kind]
        if kind == _STRING:
            return self.string(what), [kind]
        if kind != _ARRAY:
            self.fail(f"{what} has value type {kind}, expected 0..12")
        item, n = self.unpack("<IQ", f"the item type and length of {what}")
        if item in _SCALARS:  # numbers in one read: a 262k-entry score table is one np.frombuffer
            fmt = _SCALARS[item][1]
            size = struct.calcsize(fmt)
            self.need(n * size, f"{what} ({n} items)")
            values = np.frombuffer(self.buf, "<" + fmt, count=n, offset=self.pos).tolist()
            self.pos += n * size
            return values, [kind, item]
        if item != _STRING:  # arrays of arrays exist in the spec, never in a model file
            self.fail(f"{what} has items of value type {item}, expected a number or a string")
        self.need(n * 8, f"{what} ({n} items)")  # every string has an 8-byte length
        return [self.string(f"item {i} of {what}") for i in range(n)], [kind, item]


class GGUFField:
    """One metadata entry: its value (`contents()`, as the gguf package names it) and value type(s)."""

    def __init__(self, value, types: list[int]):
        self.value, self.types = value, types

    def contents(self):
        return self.value


class GGUFTensorInfo:
    """One tensor: `shape` in GGUF order (fastest dim first), `tensor_type` (a GGML type id), and `data`, a view
    of the memory-mapped file: typed for F32/F16 (NumPy shape), bytes (rows, bytes per row) for the rest."""

    def __init__(self, name: str, shape: tuple[int, ...], tensor_type: int, data: np.ndarray):
        self.name, self.shape, self.tensor_type, self.data = name, np.array(shape), tensor_type, data


class GGUFFile:
    """What minigemma reads of a GGUF file: `fields` (metadata by key) and `tensors` (GGUFTensorInfo)."""

    def __init__(self, fields: dict[str, GGUFField], tensors: list[GGUFTensorInfo]):
        self.fields, self.tensors = fields, tensors


def _read_header(r: _HeaderReader, path: Path, fields: dict) -> tuple[list, int, int]:
    """The header, front to back: fills `fields`; returns the tensor infos (name, dims, type, offset), where
    tensor data starts, and the alignment."""
    magic = bytes(r.buf[:4])
    r.pos = 4
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    (version,) = r.unpack("<I", "the version")
    if version not in (2, 3):
        r.fail(f"version {version}; only versions 2 and 3, little-endian, are supported")
    n_tensors, n_kv = r.unpack("<QQ", "the tensor and metadata counts")
    r.need(n_kv * 13, f"{n_kv} metadata entries")  # at least key length 8 + type 4 + a 1-byte value
    for _ in range(n_kv):
        key = r.string("a metadata key")
        if key in fields:
            r.fail(f"metadata {key} appears twice")
        (kind,) = r.unpack("<I", f"the type of metadata {key}")
        fields[key] = GGUFField(*r.value(kind, f"metadata {key}"))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        alignment = fields["general.alignment"].value
        if fields["general.alignment"].types != [_UINT32]:
            r.fail(f"general.alignment has value type {fields['general.alignment'].types[0]}, expected "
                   f"uint32 ({_UINT32})")
        if alignment == 0 or alignment & (alignment - 1):
            r.fail(f"general.alignment is {alignment}, expected a power of two")

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
    data_start = -(-r.pos // alignment) * alignment  # tensor data begins at the next aligned byte
    return infos, data_start, alignment


def check_gguf_header(path: Path) -> tuple[dict, list, int]:
    """Read a GGUF file's header, validating it against the file before anything is mapped or allocated.

    One pass over the header (layout in docs/formats.md; llama.cpp ggml/src/gguf.cpp gguf_init_from_file
    does the same checks): magic and version; counts that the file can hold; every string and array length
    within the file; known value types; a power-of-two general.alignment; for each tensor at most 4 dims, a
    known ggml type with whole blocks, an aligned offset, and bytes that lie inside the file and overlap no
    other tensor's. (The gguf package's GGUFReader trusts the header: a metadata array claiming 10^18 items
    makes it loop and grow lists without end; it is also ~5x slower on a 262k-token vocabulary, parsing every
    entry as its own small array. So minigemma reads the header itself.)

    Returns (fields, [(name, GGUF dims, ggml type, absolute byte offset, byte count)], file size).
    """
    from .quants import GGML_BLOCK_SIZES

    size = path.stat().st_size
    fields: dict[str, GGUFField] = {}
    with open(path, "rb") as f:
        if size < 4:
            raise ModelFileError(f"{path}: not a GGUF file ({size} bytes)")
        # the header is read through a read-only map: no copy of the file, and pages are read as needed
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            infos, data_start, alignment = _read_header(_HeaderReader(buf, path), path, fields)

    seen, spans, tensors = set(), [], []
    for name, dims, kind, offset in infos:
        where = f"{path}: tensor {name}"
        if name in seen:
            raise ModelFileError(f"{where} appears twice")
        seen.add(name)
        if kind not in GGML_BLOCK_SIZES:
            raise ModelFileError(f"{where} has unknown ggml type {kind}")
        block, block_bytes = GGML_BLOCK_SIZES[kind]
        if dims[0] % block:
            raise ModelFileError(f"{where}: row length {dims[0]} is not a multiple of its block size {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment:
            raise ModelFileError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise ModelFileError(f"{where}: its {nbytes} bytes at offset {offset} run past the end of the file "
                                 f"({size - data_start} bytes of tensor data)")
        spans.append((offset, offset + nbytes, name))
        tensors.append((name, dims, kind, data_start + offset, nbytes))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelFileError(f"{path}: tensors {name} and {other} overlap")
    return fields, tensors, size


def open_gguf(path: Path) -> GGUFFile:
    """Read a GGUF file: its metadata, checked (check_gguf_header), and its tensors as views of one read-only
    memory map (nothing is read until used)."""
    from .quants import GGML_BLOCK_SIZES

    fields, infos, size = check_gguf_header(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if infos else None
    tensors = []
    for name, dims, kind, start, nbytes in infos:
        raw = mapped[start:start + nbytes]
        shape = tuple(int(d) for d in reversed(dims))  # NumPy order: slowest dim first
        if kind in (0, 1):  # F32, F16: typed, as the gguf package gives them
            data = raw.view("<f4" if kind == 0 else "<f2").reshape(shape)
        else:  # bytes, one row of blocks per matrix row
            block, block_bytes = GGML_BLOCK_SIZES[kind]
            data = raw.reshape(shape[:-1] + (shape[-1] // block * block_bytes,))
        tensors.append(GGUFTensorInfo(name, tuple(dims), kind, data))
    return GGUFFile(fields, tensors)


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


_NUMBERS = {0, 1, 2, 3, 4, 5, 6, 10, 11, 12}  # GGUFValueType ids of the integer and float scalars


def number(reader, key: str, path: Path, default=None, positive: bool = True):
    """A numeric metadata value, or a ModelFileError naming the field if it is a string, an array or <= 0."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if len(f.types) != 1 or f.types[0] not in _NUMBERS:
        raise ModelFileError(f"{path}: metadata {key} is a {'/'.join(_TYPE_NAMES[t] for t in f.types)}, "
                             "expected a number")
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
    # What the file holds, under config.json's names (OPTIONAL_METADATA). A key the file leaves out is left out
    # here too, so GemmaConfig.from_hf_dict fills it with transformers' default for the model type: one place
    # owns defaults.
    hf = {hf_key: number(reader, f"{arch}.{key}", path) for key, hf_key in OPTIONAL_METADATA.items()
          if field(reader, f"{arch}.{key}") is not None}
    hf.update({hf_key: int(number(reader, f"tokenizer.ggml.{key}", path, positive=False))
               for key, hf_key in TOKEN_METADATA.items() if field(reader, f"tokenizer.ggml.{key}") is not None})
    if arch == "gemma4":
        hf.update(_gemma4_metadata(reader, path, n, H, D, int(embed.shape[1])))
        return _to_config(hf, path)
    hf.update({
        "model_type": MODEL_TYPES[arch],
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
    if arch != "gemma":  # Gemma 1 has no window and no caps, whatever a file says
        hf.update({hf_key: number(reader, f"{arch}.{key}", path) for key, hf_key in WINDOW_METADATA.items()
                   if field(reader, f"{arch}.{key}") is not None})
    if arch == "gemma3":
        meta("attention.sliding_window")  # required: Gemma 3 GGUF files always carry it
    if arch != "gemma":
        hf["query_pre_attn_scalar"] = D // H if (arch, n) in SCALE_BY_D_OVER_H else hf["head_dim"]
    hf.update(HARD_CODED[arch])
    return _to_config(hf, path)


# GGUF metadata key (under "{arch}.") -> config.json field, taken when the file has it
OPTIONAL_METADATA = {
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",  # the global layers' base
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",  # stored as float32 (9.99999997e-07 for 1e-6)
}
TOKEN_METADATA = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}
# Gemma 2's window and soft-caps, Gemma 3's window, when the file has them (if not, transformers' Gemma 2
# defaults 4096, 50 and 30 are also the values llama.cpp assumes)
WINDOW_METADATA = {"attention.sliding_window": "sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
                   "final_logit_softcapping": "final_logit_softcapping"}

# What GGUF does not store, llama.cpp hard-codes (src/llama-model.cpp), and so do we, as data:
#  - the layer pattern: Gemma 2 alternates sliding/global from layer 0 (set_swa_pattern(2); config.py's legacy
#    default for gemma2, so nothing to add); Gemma 3 has every 6th layer global (set_swa_pattern(6));
#  - Gemma 3's sliding layers use RoPE base 10000 (rope_freq_base_train_swa).
HARD_CODED = {
    "gemma": {},
    "gemma2": {},
    "gemma3": {"sliding_window_pattern": 6, "rope_local_base_freq": 10_000.0},
}
# The attention scale is 1/sqrt(head_dim) except on the 27B models, 1/sqrt(D/H), which llama.cpp recognises by
# (architecture, layer count): 46 for Gemma 2 27B, 62 for Gemma 3 27B.
SCALE_BY_D_OVER_H = {("gemma2", 46), ("gemma3", 62)}


def _to_config(hf: dict, path: Path) -> GemmaConfig:
    try:
        return GemmaConfig.from_hf_dict(hf)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:  # values of the wrong kind or range
        raise ModelFileError(f"{path}: {e}") from None


def per_layer(reader, key: str, path: Path, n: int) -> list | None:
    """A metadata value that may be one number or an array of one per layer (Gemma 4: head_count_kv,
    feed_forward_length), as a list of n numbers; None if absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types[0] != _ARRAY:
        return [number(reader, key, path)] * n
    values = f.contents()
    if len(values) != n or len(f.types) != 2 or f.types[1] not in _NUMBERS | {7}:
        raise ModelFileError(f"{path}: metadata {key} is not a number or an array of {n} (one per layer)")
    return values


def _gemma4_metadata(reader, path: Path, n: int, H: int, D: int, V: int) -> dict:
    """Gemma 4's config.json fields from what llama.cpp's Gemma4Model writes (conversion/gemma.py):

      key_length / key_length_swa    the global and the sliding layers' head dims
      head_count_kv                  one kv-head count, or an array per layer when the global layers differ
      feed_forward_length            F, or an array per layer: 2F on KV-shared layers (use_double_wide_mlp)
      sliding_window_pattern         one bool per layer: true for sliding
      rope.freq_base / _swa          the global and the sliding RoPE bases
      attention.shared_kv_layers     num_kv_shared_layers
      embedding_length_per_layer_input  P (0: no per-layer embeddings)
      expert_count, expert_used_count, expert_feed_forward_length   the MoE block
    and, not in the metadata: the partial rotary factor of the global layers is the share of 1.0 entries in the
    rope_freqs tensor (frequency factors: 1 rotates, 1e30 makes a pair's frequency ~0); attention_k_eq_v is
    a global layer without attn_v; vocab_size_per_layer_input is per_layer_token_embd's row count.
    """
    def meta(key, default=None, positive=True):
        value = number(reader, f"gemma4.{key}", path, default=default, positive=positive)
        if value is None:
            raise ModelFileError(f"{path}: metadata gemma4.{key} is missing")
        return value

    pattern = per_layer(reader, "gemma4.attention.sliding_window_pattern", path, n)
    if pattern is None:
        raise ModelFileError(f"{path}: metadata gemma4.attention.sliding_window_pattern is missing")
    layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    kv = per_layer(reader, "gemma4.attention.head_count_kv", path, n) or [H] * n
    ff = per_layer(reader, "gemma4.feed_forward_length", path, n)
    if ff is None:
        raise ModelFileError(f"{path}: metadata gemma4.feed_forward_length is missing")
    shared = int(meta("attention.shared_kv_layers", 0, positive=False))
    head_dim_full = int(meta("attention.key_length"))
    head_dim_swa = int(meta("attention.key_length_swa", head_dim_full))
    tensors = {t.name: t for t in reader.tensors}
    full_layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    per_layer_config = {i: {"head_dim": head_dim_full, "num_key_value_heads": int(kv[i])} for i in full_layers}

    rope_full = {"rope_type": "proportional", "rope_theta": float(meta("rope.freq_base"))}
    if "rope_freqs.weight" in tensors:
        try:
            factors = GGUFTensor(tensors["rope_freqs.weight"]).read()
        except ValueError as e:
            raise ModelFileError(f"{path}: tensor rope_freqs.weight: {e}") from None
        if factors.shape != (head_dim_full // 2,):
            raise ModelFileError(f"{path}: tensor rope_freqs.weight has shape {factors.shape}, expected "
                                 f"({head_dim_full // 2},): one frequency factor per pair of a global head")
        rope_full["partial_rotary_factor"] = 2 * int(np.sum(factors == 1.0)) / head_dim_full
    hf = {
        "model_type": "gemma4_text", "vocab_size": V, "hidden_size": D, "num_hidden_layers": n,
        "num_attention_heads": H, "head_dim": head_dim_swa, "layer_types": layer_types,
        "num_key_value_heads": int(kv[layer_types.index("sliding_attention")] if "sliding_attention" in layer_types
                                   else kv[0]),
        "per_layer_config": per_layer_config,
        "intermediate_size": int(ff[0]),
        "use_double_wide_mlp": shared > 0 and int(ff[-1]) == 2 * int(ff[0]),
        "num_kv_shared_layers": shared,
        "rope_parameters": {"full_attention": rope_full,
                            "sliding_attention": {"rope_type": "default",
                                                  "rope_theta": float(meta("rope.freq_base_swa", 10_000.0))}},
        "attention_k_eq_v": any(f"blk.{i}.attn_v.weight" not in tensors for i in full_layers if i < n - shared),
        "hidden_size_per_layer_input": int(meta("embedding_length_per_layer_input", 0, positive=False)),
    }
    if field(reader, "gemma4.attention.sliding_window") is not None:
        hf["sliding_window"] = int(meta("attention.sliding_window"))
    if field(reader, "gemma4.final_logit_softcapping") is not None:
        hf["final_logit_softcapping"] = float(meta("final_logit_softcapping"))
    if "per_layer_token_embd.weight" in tensors:
        hf["vocab_size_per_layer_input"] = int(tensors["per_layer_token_embd.weight"].shape[1])
    if field(reader, "gemma4.expert_count"):
        hf.update(enable_moe_block=True, num_experts=int(meta("expert_count")),
                  top_k_experts=int(meta("expert_used_count")),
                  moe_intermediate_size=int(meta("expert_feed_forward_length")))
    return hf


class GGUFTensor(StoredTensor):
    """One tensor of a GGUF file, read on demand (weights.StoredTensor).

    Its bytes are a view of the memory-mapped file, one row of blocks per matrix row, so a block of rows is
    a slice. Norm gains are read as stored, the full multiplier (1 + w); params.build_params takes the 1 off.
    A stacked (E, out, in) tensor of experts is read one expert at a time: rows(e, e + 1)."""

    def __init__(self, t):
        self.t, self.type = t, SUPPORTED_TYPES.get(int(t.tensor_type), str(int(t.tensor_type)))
        self.shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF dims are fastest-first

    def read(self) -> np.ndarray:
        return dequantize(self.t.data, self.t.tensor_type, self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        view = self.t.data[start:stop]
        block = dequantize(view, self.t.tensor_type, (stop - start,) + self.shape[1:])
        release_pages(view)  # converted once: the file's pages need not stay in this process's memory
        return block

    def stored(self, kind: str):
        """This tensor in storage `kind` without requantizing, if its file type allows (STORED_AS), else None."""
        make = STORED_AS.get((kind, self.type))
        return None if make is None else make(self, kind)


def _int8_from_symmetric(t: GGUFTensor, kind: str) -> Int8:
    """Q4_0 and Q5_0 are d * k with k in -8..7 or -16..15: int8 holds that exactly with the same scale, so
    these are re-encoded, not requantized (no rounding at all)."""
    rows, groups = t.shape[0], t.shape[1] // 32
    d, k = symmetric_levels(np.asarray(t.t.data).reshape(rows * groups, -1), t.type)
    return Int8(q=k.reshape(rows, groups, 32), d=d.reshape(rows, groups))


def _int4_from_q4_k(t: GGUFTensor, kind: str):
    """Q4_K's 32-weight sub-blocks are on a 4-bit grid with a scale and a minimum each: int4 holds them as they
    are, up to the fp16 rounding of those two numbers. Asked for int8 too: requantizing a 4-bit grid to 8 bits
    would only add error (docs/quantization.md). Scales beyond fp16's range: under int8, None (requantize:
    int8's smaller scales, amax/127, may fit); under int4, the error."""
    try:
        return Int4.from_q4_k(t.t.data, t.shape)
    except ValueError:
        if kind == "int4":
            raise
        return None


# (requested storage, GGUF type) -> how the file's bytes become that storage without requantizing. Q8_0 *is*
# our int8, our int4 has Q4_1's layout (a Q4_1 tensor is held as it is, though our own quantizer fits other
# scales), and the 16-bit types are ours: used in place, with no copy. Any pair not here is dequantized a block
# of rows at a time and converted (weights.to_weight).
STORED_AS = {
    ("int8", "Q8_0"): lambda t, kind: Int8.from_q8_0(t.t.data, t.shape),
    ("int4", "Q4_1"): lambda t, kind: Int4.from_q4_1(t.t.data, t.shape),
    ("int8", "Q4_0"): _int8_from_symmetric,
    ("int8", "Q5_0"): _int8_from_symmetric,
    ("int8", "Q4_K"): _int4_from_q4_k,
    ("int4", "Q4_K"): _int4_from_q4_k,
    ("float16", "F16"): lambda t, kind: Float16Bits(t.t.data, "float16"),
    ("bfloat16", "BF16"): lambda t, kind: Float16Bits(t.t.data.view(np.uint16), "bfloat16"),
}


def load_gguf_params(reader, config: GemmaConfig, path: Path, progress: bool = True, quantize: str | None = None,
                     dtype: str | None = None, prepare=lambda w: w) -> Params:
    """Read every tensor named in params.LAYER_TENSORS into its storage (float32 by default), one at a time.

    A tensor the chosen storage holds as it is, or on its own grid, is not requantized (GGUFTensor.stored);
    the others (under int8 Q6_K, say; under int4 also Q5_0) are dequantized a block of rows at a time and
    requantized. With no `quantize` nor `dtype` each is dequantized to float32, the reference."""
    bar = tqdm(total=len(reader.tensors), desc=f"loading {path.name}", unit="tensor", disable=not progress,
               leave=False)
    try:
        # an "output.weight" would be an untied head: Gemma ties it and llama.cpp's converter skips it
        return build_params(config, {t.name: GGUFTensor(t) for t in reader.tensors}, "gguf", str(path),
                            ignore=GGUF_IGNORED, quantize=quantize, dtype=dtype, prepare=prepare, done=bar.update)
    finally:
        bar.close()
