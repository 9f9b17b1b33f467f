"""Load a Hugging Face checkpoint directory: config.json + model.safetensors (or shards + index).

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian tensor bytes. We memory-map the file and view each tensor in place, so
float32 weights are never copied (the OS pages them in on use). float16 and bfloat16 are widened to float32
(NumPy has no bfloat16, so those come from the raw bits: a bfloat16 is the top half of a float32), or kept as
they are with `dtype="bfloat16"`/`"float16"`, or quantized a block of rows at a time (weights.to_weight).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import GemmaConfig
from .params import Params, build_params
from .quants import bf16_to_f32
from .weights import Float16Bits, StoredTensor, release_pages

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits, widened below


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


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
            raise ValueError(f"{self.path}: tensor {name} has dtype {info['dtype']}, expected F32, F16 or BF16")
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


def load_hf_params(directory: Path, config: GemmaConfig, quantize: str | None = None,
                   dtype: str | None = None) -> Params:
    """Read every tensor named in params.LAYER_TENSORS from the directory's safetensors file(s)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").exists():
        files = [SafetensorsFile(directory / "model.safetensors")]
    else:
        raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    tensors = {}  # text-model name -> reader
    for file in files:
        for name in file.names():
            mapped = text_model_name(name)
            if mapped is not None:
                tensors[mapped] = SafetensorsTensor(file, name)
    # the head is tied to the embedding; a checkpoint may still store a copy of it, which we don't need
    return build_params(config, tensors, "hf", str(directory), ignore={"lm_head.weight"}, quantize=quantize,
                        dtype=dtype)
