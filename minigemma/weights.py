"""Weight matrices as plain data: how each storage type holds an (out, in) matrix, and how to read rows back.

    type        held as                                           bytes/weight   where it comes from
    float32     a plain np.ndarray (out, in)                      4              the reference
    bfloat16    Float16Bits: uint16 bit patterns (out, in)        2              HF checkpoints' usual dtype
    float16     Float16Bits: np.float16 (out, in)                 2
    int8        Int8: int8 q (out, in/32, 32) + fp16 scale d      1.0625         = GGUF Q8_0, bit for bit
    int4        Int4: nibbles (out, in/32, 16) + fp16 d and m     0.625          = GGUF Q4_1's layout

Each type knows its logical `shape` (out, in) and `nbytes`, and has `rows(start, stop)`: the float32 values of
a block of rows. That is the readable definition of the format, and what the NumPy reference uses
(layers.linear dequantizes a block of rows, multiplies, moves on: a whole matrix is never widened at once).
The Numba backend repacks int8 and int4 into layouts of its own (packed.py).

int8 is symmetric, one scale per group of 32 along the input dimension: x = d * q, d = max|x| / 127. It is
llama.cpp's Q8_0 (ggml-quants.c quantize_row_q8_0_ref), so a Q8_0 tensor of a GGUF file is used as stored: `q`
and `d` are views of the memory-mapped file, nothing is copied or requantized.

int4 is asymmetric, a scale and a minimum per group of 32: x = d * q + m, q in 0..15. It is llama.cpp's Q4_1
layout, with d and m chosen by least squares (Int4.from_float). Measured on the built-in model
(docs/quantization.md) it is clearly better than the symmetric Q4_0 layout, for 1/16 byte more per weight.
Under "int4" the most sensitive matrices stay int8 (storage_for): the tied embedding / LM head and down_proj in
some blocks, as in llama.cpp's Q4_K_M, and every v_proj.

A GGUF tensor already on one of these grids is not requantized (gguf_file.GGUFTensor.stored): Q8_0 is used in
place as int8, Q4_0/Q5_0 become int8 exactly, and Q4_K's sub-blocks become int4 up to the fp16 rounding of
their scales, under "int8" as well as "int4" (8 bits would only add error to a 4-bit grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quants import bf16_to_f32, pack_nibbles, q4_k_sub_blocks, scaled, unpack_nibbles

GROUP = 32  # weights per scale, along the input dimension


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does.

    bfloat16 is the top 16 bits of a float32. Rounding: add 0x7FFF plus the lowest kept bit, then cut
    (NaN stays NaN: its top bits are kept as they are)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x40)
    return rounded


@dataclass
class Float16Bits:
    """A matrix stored in 16 bits: bfloat16 (as uint16 bit patterns: NumPy has no bfloat16) or float16."""

    data: np.ndarray  # (out, in) uint16 (bfloat16 bits) or float16
    dtype: str  # "bfloat16" or "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32"""
        block = self.data[start:stop]
        return bf16_to_f32(block) if self.dtype == "bfloat16" else block.astype(np.float32)

    @classmethod
    def from_float(cls, x: np.ndarray, dtype: str) -> "Float16Bits":
        return cls(f32_to_bf16(x) if dtype == "bfloat16" else x.astype(np.float16), dtype)


@dataclass
class Int8:
    """Symmetric int8, one fp16 scale per group of 32 inputs: row r, group g holds x = d[r, g] * q[r, g, :]."""

    q: np.ndarray  # (out, in/32, 32) int8
    d: np.ndarray  # (out, in/32) float16

    @property
    def shape(self) -> tuple[int, int]:
        out, groups, _ = self.q.shape
        return out, groups * GROUP

    @property
    def nbytes(self) -> int:
        return self.q.size + 2 * self.d.size

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32"""
        return scaled(self.q[start:stop], self.d[start:stop]).reshape(stop - start, -1)  # (R, G, 32) -> (R, in)

    @classmethod
    def from_float(cls, x: np.ndarray) -> "Int8":
        """Quantize (out, in) float32, as llama.cpp's quantize_row_q8_0_ref: d = amax / 127 (stored as fp16),
        q = round(x / d) with the float32 d."""
        groups = _groups(x)  # (out, G, 32)
        d = np.abs(groups).max(axis=-1) / np.float32(127)  # (out, G)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        q = _round_half_away(groups * inv[..., None]).astype(np.int8)  # |x| / d <= 127: no clipping needed
        return cls(q, d.astype(np.float16))

    @classmethod
    def from_q8_0(cls, data: np.ndarray, shape: tuple[int, int]) -> "Int8":
        """A view of GGUF Q8_0 bytes (out, in/32 * 34), no copy: each 34-byte block is d (fp16) then 32 int8."""
        blocks = data.reshape(shape[0], shape[1] // GROUP, 34)
        return cls(q=blocks[..., 2:].view(np.int8), d=blocks[..., :2].view("<f2")[..., 0])


@dataclass
class Int4:
    """Asymmetric 4-bit, per group of 32 inputs a fp16 scale d and minimum m: x = d * q + m, q in 0..15.

    Two weights per byte, as ggml packs them: byte j of a group holds element j in its low nibble and
    element j + 16 in its high nibble."""

    nibbles: np.ndarray  # (out, in/32, 16) uint8
    d: np.ndarray  # (out, in/32) float16
    m: np.ndarray  # (out, in/32) float16

    @property
    def shape(self) -> tuple[int, int]:
        out, groups, _ = self.nibbles.shape
        return out, groups * GROUP

    @property
    def nbytes(self) -> int:
        return self.nibbles.size + 2 * self.d.size + 2 * self.m.size

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32"""
        q = unpack_nibbles(self.nibbles[start:stop])  # (R, G, 16) -> (R, G, 32)
        return scaled(q, self.d[start:stop], self.m[start:stop]).reshape(stop - start, -1)

    @classmethod
    def from_float(cls, x: np.ndarray) -> "Int4":
        """Quantize (out, in) float32 to the Q4_1 layout, choosing each group's d and m by least squares.

        llama.cpp's reference Q4_1 quantizer (quantize_row_q4_1_ref) just spans the group: d = (max - min)/15,
        m = min. Here, as in llama.cpp's K-quant quantizers (make_qkx2_quants), a few grids slightly finer or
        coarser than that are tried; for each, the levels q are assigned, then d and m are refit by least
        squares, min sum (x - d q - m)^2, and the grid with the smallest error wins (the plain span is the
        baseline, so no group gets worse). On the built-in model this cuts the squared error by ~20% on
        tensors stored as Q5_0/Q6_K, and recovers a Q4_K tensor's grid almost exactly (its 32-weight
        sub-blocks are already d q + m)."""
        groups = _groups(x)  # (out, G, 32)
        lo, hi = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)  # (out, G, 1)
        span = np.where(hi > lo, hi - lo, np.float32(1))
        best_d, best_m = _fp16_round((hi - lo) / np.float32(15)), _fp16_round(lo)
        best_err = _q4_error(groups, best_d, best_m)
        n = np.float32(GROUP)
        for k in (-2, -1, 0, 1):  # 13, 14, 15, 16 steps across the group's span
            q = np.clip(np.rint((groups - lo) * (np.float32(15 + k) / span)), 0, 15)
            sq, sqq = q.sum(-1, keepdims=True), (q * q).sum(-1, keepdims=True)
            sx, sqx = groups.sum(-1, keepdims=True), (q * groups).sum(-1, keepdims=True)
            det = n * sqq - sq * sq  # 0 when every q is the same: no slope to fit
            d = np.where(det > 0, (n * sqx - sq * sx) / np.where(det > 0, det, 1), 0)
            d, m = _fp16_round(d), _fp16_round((sx - d * sq) / n)
            err = _q4_error(groups, d, m)
            better = err < best_err
            best_d, best_m, best_err = (np.where(better, d, best_d), np.where(better, m, best_m),
                                        np.where(better, err, best_err))
        q = _q4_levels(groups, best_d, best_m).astype(np.uint8)
        return cls(pack_nibbles(q), best_d[..., 0].astype(np.float16),
                   best_m[..., 0].astype(np.float16))

    @classmethod
    def from_q4_k(cls, data: np.ndarray, shape: tuple[int, int]) -> "Int4":
        """GGUF Q4_K bytes (out, in/256 * 144) as int4, without requantizing.

        A Q4_K sub-block of 32 weights is already (d * sc) * q - dmin * m with q in 0..15: one scale and
        one minimum per 32, Q4_1's form. Only the two products are rounded, to fp16 (a relative 2^-11 of each);
        requantizing the weights to int8 instead would move each by up to half an int8 step, ~10x more."""
        rows, width = shape
        # the whole tensor at once: ~2 bytes per weight of temporaries (levels, nibbles), no float32 copy
        scale, offset, q = q4_k_sub_blocks(np.asarray(data).reshape(-1, 144))  # per sub-block of 32
        if max(np.abs(scale).max(), np.abs(offset).max()) > np.finfo(np.float16).max:
            raise ValueError("Q4_K sub-block scales exceed float16's range (65504): int4 cannot hold them")
        groups = width // GROUP
        return cls(nibbles=pack_nibbles(q).reshape(rows, groups, 16),
                   d=scale.astype(np.float16).reshape(rows, groups),
                   m=offset.astype(np.float16).reshape(rows, groups))

    @classmethod
    def from_q4_1(cls, data: np.ndarray, shape: tuple[int, int]) -> "Int4":
        """A view of GGUF Q4_1 bytes (out, in/32 * 20), no copy: d (fp16), m (fp16), 16 bytes of nibbles."""
        blocks = data.reshape(shape[0], shape[1] // GROUP, 20)
        return cls(nibbles=blocks[..., 4:], d=blocks[..., :2].view("<f2")[..., 0],
                   m=blocks[..., 2:4].view("<f2")[..., 0])


@dataclass
class LoRA:
    """A frozen weight plus a trainable low-rank update (Hu et al. 2021, "LoRA"): W + scale * B @ A.

    `base` is any weight type here (float32, 16-bit, int8, int4: int8/int4 bases make QLoRA); only A and B
    are trained. The product is never formed as a matrix: x @ (W + s B A).T = x @ W.T + s (x @ A.T) @ B.T,
    so a rank-8 update of a 640 x 2048 matrix costs 8 * (640 + 2048) multiply-adds per token, not a second
    matrix. PEFT's names: A is `lora_A` (r, in), B is `lora_B` (out, r), scale = lora_alpha / r.
    """

    base: object  # (out, in) any weight type
    A: np.ndarray  # (r, in) float32
    B: np.ndarray  # (out, r) float32
    scale: float  # lora_alpha / r

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)

    @property
    def nbytes(self) -> int:
        return int(self.base.nbytes) + self.A.nbytes + self.B.nbytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32: the merged rows W + scale * B A"""
        base = self.base[start:stop] if isinstance(self.base, np.ndarray) else self.base.rows(start, stop)
        return base + np.float32(self.scale) * (self.B[start:stop] @ self.A)


def _fp16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to the fp16 value it will be stored as, back in float32."""
    return x.astype(np.float16).astype(np.float32)


def _q4_levels(groups: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The nearest of the 16 levels d q + m for each weight: q in 0..15. Shapes: (..., 32), (..., 1) x2"""
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    return np.clip(np.rint((groups - m) * inv), 0, 15)


def _q4_error(groups: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Squared error of each group on the grid (d, m). Shapes: (..., 32), (..., 1) x2 -> (..., 1)"""
    return ((groups - (d * _q4_levels(groups, d, m) + m)) ** 2).sum(-1, keepdims=True)

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (np.rint rounds them to even), as llama.cpp quantizes."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _groups(x: np.ndarray) -> np.ndarray:
    """(out, in) -> (out, in/32, 32) float32, refusing widths that are not whole groups."""
    out, width = x.shape
    if width % GROUP:
        raise ValueError(f"cannot quantize a matrix of width {width}: it must be a multiple of {GROUP}")
    return np.asarray(x, dtype=np.float32).reshape(out, width // GROUP, GROUP)


# ---- from a file's tensor to the chosen storage ----------------------------------------------------------

QUANTIZE_CHOICES = ("int8", "int4")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class StoredTensor:
    """What a loader offers for one tensor of a file (hf.py, gguf_file.py implement it):
      shape           the NumPy shape, known before anything is read
      read()          the whole tensor as float32
      rows(a, b)      rows a..b-1 as float32 (for converting a big matrix a block at a time)
      stored(kind)    the tensor as weight type `kind` without conversion, if the file holds it that way
                      (a GGUF Q8_0 tensor for "int8", a safetensors BF16 tensor for "bfloat16"), else None
    """

    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def stored(self, kind: str):
        return None


def storage_for(field: str, quantize: str | None, dtype: str | None, layer: int | None = None,
                n_layers: int | None = None) -> str:
    """The storage of one parameter: `layer` of `n_layers` for a block's matrices, None for the embedding.
    Norms (1-D) stay float32 (see to_weight).

    Under "int4", the matrices whose 4-bit error costs the most stay int8 (measured on the built-in model in
    docs/quantization.md): the tied embedding / LM head (the input of every token and the output
    distribution) and down_proj in the first and last eighth of the blocks and every third one between, as
    llama.cpp's Q4_K_M keeps them at more bits (llama-quant.cpp: llama_tensor_get_type, use_more_bits); and
    every v_proj, where llama.cpp raises only those blocks' (1% of the weights, and a third of the error when
    all layer matrices are int4)."""
    if quantize == "int4" and (field in ("embed", "v_proj") or
                               (field == "down_proj" and layer is not None and more_bits(layer, n_layers))):
        return "int8"
    return quantize or dtype or "float32"


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the blocks whose down_proj Q4_K_M keeps at 6 bits (9 of the 270M's 18)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def to_weight(t: StoredTensor, kind: str):
    """A file's tensor in storage `kind`. 1-D tensors (norms) are always float32. A tensor the file already
    holds in that form is used as it is (`t.stored`: a GGUF Q8_0 tensor as int8, say, or re-encoded exactly:
    GGUF Q4_0/Q5_0 as int8).

    A big matrix is converted a block of rows at a time into preallocated arrays, so converting never holds
    a float32 copy of the whole matrix (a gemma-2b embedding is 2.1 GB in float32, 0.56 GB in int8)."""
    if kind == "float32" or len(t.shape) == 1:
        return t.read()
    as_stored = t.stored(kind)
    if as_stored is not None:
        return as_stored
    make = {"int8": Int8.from_float, "int4": Int4.from_float,
            "bfloat16": lambda x: Float16Bits.from_float(x, "bfloat16"),
            "float16": lambda x: Float16Bits.from_float(x, "float16")}[kind]
    out_rows, width = t.shape
    step = block_rows(width)
    first = make(t.rows(0, min(step, out_rows)))
    # every array field gets its full size now; the blocks are written into it
    fields = {f: (np.empty((out_rows,) + v.shape[1:], v.dtype) if isinstance(v, np.ndarray) else v)
              for f, v in vars(first).items()}
    for start in range(0, out_rows, step):
        part = first if start == 0 else make(t.rows(start, min(start + step, out_rows)))
        for f, v in vars(part).items():
            if isinstance(v, np.ndarray):
                fields[f][start:start + len(v)] = v
    return type(first)(**fields)


BLOCK_BYTES = 1 << 22  # float32 bytes of one block of rows: 4 MiB stays in the L2/L3 caches


def block_rows(width: int) -> int:
    """How many rows of a matrix `width` wide make one block of BLOCK_BYTES float32."""
    return max(1, BLOCK_BYTES // (4 * width))


def nbytes(w) -> int:
    """Bytes of one weight, whatever its type."""
    return int(w.nbytes)


def dequantize(w) -> np.ndarray:
    """The whole matrix as float32 (for tests and notebooks; the kernels never do this)."""
    return w if isinstance(w, np.ndarray) else w.rows(0, w.shape[0])
