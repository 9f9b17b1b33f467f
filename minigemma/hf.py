"""Load a Hugging Face checkpoint directory: config.json + model.safetensors (or shards + index).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian tensor bytes. We memory-map the file and view each tensor in place, so
float32 weights are never copied (the OS pages them in on use). float16 and bfloat16 are widened to float32
(NumPy has no bfloat16, so those come from the raw bits: a bfloat16 is the top half of a float32), or kept as
they are with `dtype="bfloat16"`/`"float16"`, or quantized a block of rows at a time (weights.to_weight).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .config import GemmaConfig
from .errors import ModelFileError
from .params import Params, build_params
from .quants import bf16_to_f32
from .packed import release_pages
from .weights import Float16Bits, StoredTensor

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits, widened below

# Every dtype the safetensors format defines, with its size in bytes: a file may hold any of them, and the
# header must add up for all of them; only the three above can be read as weights (safetensors `Dtype`).
ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE in safetensors/lib.rs)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts, checked against
    the file before anything else is read, allocated or mapped (the file is untrusted):

      * the header length fits in the file and under MAX_HEADER_BYTES;
      * the header is a JSON object of {name: {dtype, shape, data_offsets}} (and an optional __metadata__);
      * each tensor's bytes lie inside the data section, hold exactly prod(shape) items of its dtype, and
        overlap no other tensor's.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelFileError(f"{path}: not a safetensors file (only {len(raw)} bytes, expected an 8-byte "
                                 "header length first)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(f"{path}: not a safetensors file (header length {n} bytes, but the file has "
                                 f"{size - 8} bytes after the length and the limit is {MAX_HEADER_BYTES})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ModelFileError(f"{path}: not a safetensors file (the header is not valid UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, "
                             "expected an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        begin, end = _check_entry(path, name, info, data_size)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelFileError(f"{path}: tensors {name} and {other} overlap (bytes {begin}..{end} of the data)")
    return header, 8 + n


def _check_entry(path: Path, name: str, info, data_size: int) -> tuple[int, int]:
    """One header entry: a known dtype, a shape of whole numbers, and data_offsets [begin, end) inside the data
    section that hold exactly the shape's bytes. Returns (begin, end)."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ModelFileError(f"{where}: expected an entry with dtype, shape and data_offsets, got {info!r:.80}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_SIZE:
        raise ModelFileError(f"{where}: unknown dtype {dtype!r:.40} (expected one of {', '.join(ITEM_SIZE)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ModelFileError(f"{where}: shape {shape!r:.80} is not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ModelFileError(f"{where}: data_offsets {offsets!r:.80} are not [begin, end] within the "
                             f"{data_size} bytes of tensor data")
    expected = math.prod(shape) * ITEM_SIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise ModelFileError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
                             f"{dtype} {tuple(shape)} needs {expected}")
    return offsets[0], offsets[1]


class SafetensorsFile:
    """Tensors of one .safetensors file, viewed in place through a memory map."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = read_safetensors_header(path)
        self.mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self):
        return self.header.keys()

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, viewed in place: float32, float16, or uint16 bfloat16 bit patterns."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelFileError(f"{self.path}: tensor {name} has dtype {info['dtype']}, expected F32, F16 or BF16")
        start, end = (self.data_start + o for o in info["data_offsets"])
        return self.mmap[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])  # bytes -> e.g. (out, in)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (a view of the file for F32, a new array for F16/BF16)."""
        return _widen(self.raw(name), self.header[name]["dtype"])


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(array) if dtype == "BF16" else array.astype(np.float32, copy=False)


class SafetensorsTensor(StoredTensor):
    """One tensor of a safetensors file, read on demand (weights.StoredTensor)."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.dtype = file.header[name]["dtype"]
        self.shape = tuple(file.header[name]["shape"])

    def read(self) -> np.ndarray:
        return self.file.get(self.name)

    def rows(self, start: int, stop: int) -> np.ndarray:
        view = self.file.raw(self.name)[start:stop]
        block = _widen(view, self.dtype)
        release_pages(view)  # converted once: the file's pages need not stay in this process's memory
        return block

    def stored(self, kind: str):
        # 16-bit tensors are used as they are, viewed in the memory-mapped file
        if (kind, self.dtype) in (("bfloat16", "BF16"), ("float16", "F16")):
            return Float16Bits(self.file.raw(self.name), kind)
        return None


def text_model_name(name: str) -> str | None:
    """Map a checkpoint tensor name to its Gemma text-model name, or None for tensors we don't use.

    Multimodal Gemma 3 (4b+) checkpoints keep the language model under a prefix: the original release used
    "language_model.model.layers..." and transformers >= 4.52 saves "model.language_model.layers...".
    Their vision tower and projector are not part of the text model.
    """
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    if name.startswith(("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                        "model.multi_modal_projector.")):
        return None
    return name


def shard_names(index: Path) -> list[str]:
    """The shard files an index's weight_map names: plain file names in the index's own directory (an
    untrusted index must not point elsewhere, e.g. "../../x")."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{index}: expected a JSON object with a weight_map of names to files") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ModelFileError(f"{index}: weight_map names {name!r:.80}, expected a .safetensors file name "
                                 "in the same directory")
        if not (index.parent / name).is_file():
            raise ModelFileError(f"{index}: shard {name} is missing")
    return names


def safetensors_paths(directory: Path) -> list[Path]:
    """The checkpoint's safetensors file(s): the shards an index names, or model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / f for f in shard_names(index)]
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    refuse_pickles(directory)
    raise ModelFileError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def refuse_pickles(directory: Path) -> None:
    """Say so if the folder's weights are PyTorch pickles. `.bin`/`.pt` files are Python pickles, and
    unpickling runs whatever code the file names: a downloaded one is a program, not data. minigemma never
    unpickles."""
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
    if pickles:
        raise ModelFileError(f"{directory}: has only PyTorch pickle weights ({pickles[0]}); minigemma needs "
                             "model.safetensors, because loading a pickle can run code hidden in the file "
                             "(download the repo's safetensors files, or convert where you trust the file)")


def load_hf_params(directory: Path, config: GemmaConfig, quantize: str | None = None,
                   dtype: str | None = None, prepare=lambda w: w) -> Params:
    """Read every tensor named in params.LAYER_TENSORS from the directory's safetensors file(s)."""
    files = [SafetensorsFile(path) for path in safetensors_paths(directory)]

    tensors = {}  # text-model name -> reader
    for file in files:
        for name in file.names():
            mapped = text_model_name(name)
            if mapped in tensors:
                raise ModelFileError(f"{file.path}: tensor {name} is also in another shard")
            if mapped is not None:
                tensors[mapped] = SafetensorsTensor(file, name)
    # the head is tied to the embedding; a checkpoint may still store a copy of it, which we don't need
    return build_params(config, tensors, "hf", str(directory), ignore={"lm_head.weight"}, quantize=quantize,
                        dtype=dtype, prepare=prepare)
