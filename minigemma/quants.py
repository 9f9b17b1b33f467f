"""GGUF tensor bytes -> float32 NumPy arrays.

A GGUF file stores each weight matrix row by row, and each row as a run of fixed-size *blocks*: a block holds
32 (or, for the K-quants, 256) consecutive weights as small integers plus one or more fp16 scales. Dequantizing
is "unpack the integers, multiply by the scale" done for every block at once. Each block type below is one
function taking `(n_blocks, bytes_per_block)` uint8 and returning `(n_blocks, elements_per_block)` float32,
with a header that draws the block like the C struct it mirrors.

The layouts are the ones in llama.cpp (`ggml/src/ggml-common.h` for the structs, `ggml-quants.c`
`dequantize_row_*` for the formulas); the `gguf` package's `gguf/quants.py` does the same in NumPy and is the
oracle in tests/test_quants.py. All fields are little-endian, whatever the host. Arithmetic is float32
throughout (fp16 scales are widened first), in the same order as llama.cpp, so results match it bit for bit.
"""

from __future__ import annotations

import numpy as np

QK = 32  # weights per block in the "legacy" formats Q4_0 ... Q8_0
QK_K = 256  # weights per super-block in the K-quants, split into 8 sub-blocks of 32 (Q6_K: 16 of 16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 array of bfloat16 bit patterns -> float32 array of same shape (bits << 16). NumPy has no bfloat16.

    bfloat16 is the top half of a float32 (same sign and 8-bit exponent, mantissa cut to 7 bits), so widening
    is exact: put the 16 bits in the high half and zeros in the low half.
    """
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)  # the one new array
    wide <<= 16  # in place: no second temporary of the same size
    return wide.view(np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 holding fp16 scales -> (n, 1) float32, ready to broadcast over a block."""
    return b.view("<f2").astype(np.float32)


def unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """(..., m) uint8 -> (..., 2m) uint8: the m low nibbles first, then the m high nibbles.

    This is how every 4-bit ggml format packs, and minigemma's int4 too: byte j holds element j (low) and
    element j + m (high), so the first and second halves of a run come out contiguous."""
    return np.concatenate([b & 0x0F, b >> 4], axis=-1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """The inverse of unpack_nibbles: (..., 2m) levels 0..15 -> (..., m) uint8."""
    q = q.astype(np.uint8)
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def scaled(q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """x = d * q (+ m) per block, in float32: the dequantization of Q8_0 (d, q int8) and of Q4_1 (d, m, q in
    0..15), and so of minigemma's int8 and int4 (weights.Int8 / Int4 are those layouts).

    Shapes: q (..., 32), d and m (...) or (..., 1) -> (..., 32) float32"""
    d = np.asarray(d).astype(np.float32).reshape(q.shape[:-1] + (1,))
    x = q.astype(np.float32)
    np.multiply(x, d, out=x)  # in place: the 262144x640 embedding is 670 MB of float32 already
    if m is not None:
        x += np.asarray(m).astype(np.float32).reshape(q.shape[:-1] + (1,))
    return x


# -- plain floats (one "block" = one element) ---------------------------------------------------------------

def _f32(b):  # (n, 4) -> (n, 1)
    return b.view("<f4").astype(np.float32)  # a copy: the caller may hold a read-only memmap


def _bf16(b):  # (n, 2) -> (n, 1)
    return bf16_to_f32(b.view("<u2"))


# -- the legacy 32-weight blocks ------------------------------------------------------------------------------

# block_q8_0, 34 bytes: d fp16 [0:2] | qs int8 x32 [2:34]
#   x[i] = d * qs[i]            (quantizer: d = max|x| / 127, qs = round(x / d))
def _q8_0(blocks):
    return scaled(blocks[:, 2:].view(np.int8), blocks[:, :2].view("<f2"))  # (n, 32)


# block_q4_0, 18 bytes: d fp16 [0:2] | qs 16 bytes [2:18], two 4-bit weights per byte
#   x[i] = d * (q[i] - 8)       q[0:16] = low nibbles, q[16:32] = high nibbles
def _q4_0(blocks):
    d, k = symmetric_levels(blocks, "Q4_0")
    return d.astype(np.float32)[:, None] * k.astype(np.float32)


# block_q4_1, 20 bytes: d fp16 [0:2] | m fp16 [2:4] | qs 16 bytes [4:20]
#   x[i] = d * q[i] + m         unsigned q with an offset m: better for blocks not centred on zero
def _q4_1(blocks):
    return scaled(unpack_nibbles(blocks[:, 4:]), blocks[:, :2].view("<f2"), blocks[:, 2:4].view("<f2"))


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 = one little-endian uint32 per block -> (n, 32): bit i is the 5th bit of weight i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")  # byte 0 bit 0 first == uint32 bit 0 first


# block_q5_0, 22 bytes: d fp16 [0:2] | qh uint32 [2:6] | qs 16 bytes [6:22]
#   x[i] = d * ((q[i] | h[i] << 4) - 16)     q as in Q4_0, h[i] = bit i of qh
def _q5_0(blocks):
    d, k = symmetric_levels(blocks, "Q5_0")
    return d.astype(np.float32)[:, None] * k.astype(np.float32)


def symmetric_levels(blocks: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 or Q5_0 blocks as their fp16 scale and signed integer levels: x = d * k.

    (n, 18 or 22) uint8 -> d (n,) float16, k (n, 32) int8 with k in -8..7 (Q4_0) or -16..15 (Q5_0). These
    levels fit int8 with the same scale, so such a tensor becomes minigemma's int8 (Q8_0 layout) exactly."""
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2")[:, 0]
    if name == "Q4_0":
        k = unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    else:
        k = (unpack_nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6]) << 4).astype(np.int8) - np.int8(16)
    return d, k


# block_q5_1, 24 bytes: d fp16 [0:2] | m fp16 [2:4] | qh uint32 [4:8] | qs 16 bytes [8:24]
#   x[i] = d * (q[i] | h[i] << 4) + m
def _q5_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    h, q = _fifth_bits(blocks[:, 4:8]), unpack_nibbles(blocks[:, 8:])
    return d * (q | h << 4).astype(np.float32) + m


# -- the K-quants: 256-weight super-blocks with a second level of small integer scales -------------------------

def _scales_mins_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed bytes -> sc, m, each (n, 8) uint8: the 6-bit scale and min of the 8 sub-blocks.

    8 scales + 8 mins at 6 bits is 96 bits = 12 bytes, with no padding. Bytes 0-3 hold scales 0-3 and bytes
    4-7 mins 0-3 in their low 6 bits. Sub-blocks 4-7 have their low 4 bits in the nibbles of bytes 8-11
    (scale low, min high) and their top 2 bits in the spare top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    llama.cpp: `get_scale_min_k4`.
    """
    lo_sc, lo_m, packed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (packed & 0x0F) | (lo_sc >> 6) << 4], axis=-1)
    m = np.concatenate([lo_m & 63, (packed >> 4) | (lo_m >> 6) << 4], axis=-1)
    return sc, m


# block_q4_K, 144 bytes: d fp16 [0:2] | dmin fp16 [2:4] | scales 12 bytes [4:16] | qs 128 bytes [16:144]
#   sub-block j (32 weights): x = (d * sc[j]) * q - (dmin * m[j])
#   qs comes in 4 runs of 32 bytes; run r holds sub-block 2r in its low nibbles and 2r+1 in its high ones.
def _q4_k(blocks):
    scale, offset, q = q4_k_sub_blocks(blocks)
    return (scale[:, :, None] * q + offset[:, :, None]).reshape(len(blocks), QK_K)


def q4_k_sub_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks as 32-weight sub-blocks on a 4-bit grid: x = scale * q + offset, q in 0..15.

    (n, 144) uint8 -> scale (n, 8) float32 = d * sc, offset (n, 8) float32 = -dmin * m, q (n, 8, 32) uint8.
    That is Q4_1's form (a scale and a minimum per 32 weights), which is how minigemma's int4 holds a Q4_K
    tensor without requantizing it (weights.Int4.from_q4_k)."""
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _scales_mins_k4(blocks[:, 4:16])
    q = unpack_nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)  # (n, run, 64) -> (n, sub-block, 32)
    return d * sc, -(dmin * m), q


# block_q5_K, 176 bytes: d fp16 [0:2] | dmin fp16 [2:4] | scales 12 [4:16] | qh 32 [16:48] | qs 128 [48:176]
#   as Q4_K with a 5th bit: weight l of sub-block j gets bit j of qh[l]; x = (d * sc[j]) * (q | h << 4) - dmin * m[j]
def _q5_k(blocks):
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = _scales_mins_k4(blocks[:, 4:16])
    h = np.unpackbits(blocks[:, 16:48, None], axis=-1, bitorder="little")  # (n, l, j) = bit j of qh[l]
    h = h.transpose(0, 2, 1)  # (n, 32, 8) -> (n, 8, 32)
    q = unpack_nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    x = (d * sc)[:, :, None] * (q | h << 4) - (dmin * m)[:, :, None]
    return x.reshape(n, QK_K)


# block_q6_K, 210 bytes: ql 128 [0:128] | qh 64 [128:192] | scales int8 x16 [192:208] | d fp16 [208:210]
#   16 groups of 16 weights: x = (d * scales[g]) * (q - 32), q = 4 low bits from ql | 2 high bits from qh << 4
#   Note d comes *last* here, unlike every other format. Each 128-weight half uses 64 bytes of ql and 32 of qh:
#   its 4 runs of 32 weights take their low bits from the low nibbles of ql[0:32], ql[32:64], then the high
#   nibbles of the same (that is exactly _nibbles' order), and their high bits from bits 0-1, 2-3, 4-5, 6-7 of qh[0:32].
def _q6_k(blocks):
    n = len(blocks)
    lo = unpack_nibbles(blocks[:, 0:128].reshape(n, 2, 64))  # (n, half, 128)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]  # one per run of 32
    hi = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3  # (n, half, run, 32)
    q = (lo | hi.reshape(n, 2, 128) << 4).astype(np.int8) - 32  # 0..63 -> -32..31
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16), signed: no separate min needed
    d = _f16(blocks[:, 208:210])
    x = (d * scales)[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)
    return x.reshape(n, QK_K)


# ggml type id (gguf.GGMLQuantizationType) -> (name, elements per block, bytes per block, function).
# The sizes are llama.cpp's GGML_QUANT_SIZES; tests check them against the gguf package.
_TABLE = {
    0: ("F32", 1, 4, _f32),
    1: ("F16", 1, 2, _f16),  # (n, 2) -> (n, 1)
    30: ("BF16", 1, 2, _bf16),
    8: ("Q8_0", QK, 34, _q8_0),
    2: ("Q4_0", QK, 18, _q4_0),
    3: ("Q4_1", QK, 20, _q4_1),
    6: ("Q5_0", QK, 22, _q5_0),
    7: ("Q5_1", QK, 24, _q5_1),
    12: ("Q4_K", QK_K, 144, _q4_k),
    13: ("Q5_K", QK_K, 176, _q5_k),
    14: ("Q6_K", QK_K, 210, _q6_k),
}

SUPPORTED_TYPES: dict[int, str] = {type_id: row[0] for type_id, row in _TABLE.items()}


def _all_block_sizes() -> dict[int, tuple[int, int]]:
    """(elements, bytes) per block of every ggml type the gguf package knows, the ones we can't dequantize
    too (a file may hold them; it is the loader's job to say which tensor has which unsupported type)."""
    from gguf import GGML_QUANT_SIZES

    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


GGML_BLOCK_SIZES = _all_block_sizes()


def _type_name(ggml_type: int) -> str:
    try:  # the gguf package knows every type's name; only used for the error message
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return "unknown"


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor data as gguf_file.open_gguf (and gguf.GGUFReader) give it (`tensor.data`: for F32/F16 a typed
    array, for BF16 and block-quantized types a uint8 array, possibly 2-D with shape (rows, bytes_per_row)) -> float32 array of
    `shape` (the NumPy shape, i.e. reversed GGUF dims: (rows, cols)). Raises ValueError naming the type for types
    it does not support.

    Always returns a new, writable array; `data` (often a read-only memmap) is only read.
    """
    ggml_type = int(ggml_type)
    if ggml_type not in _TABLE:
        raise ValueError(f"cannot dequantize GGML type {_type_name(ggml_type)} (id {ggml_type}); "
                         f"supported: {', '.join(SUPPORTED_TYPES.values())}")
    name, block_elems, block_bytes, unpack = _TABLE[ggml_type]
    shape = tuple(int(s) for s in shape)
    n_elems = int(np.prod(shape))
    # Blocks never straddle rows in GGUF: each row is a whole number of blocks.
    if shape and shape[-1] % block_elems:
        raise ValueError(f"{name}: row length {shape[-1]} is not a multiple of the block size {block_elems}")
    n_blocks = n_elems // block_elems
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # a view, no copy, for a memmap
    if raw.size != n_blocks * block_bytes:
        raise ValueError(f"{name}: {raw.size} bytes do not hold {shape} ({n_blocks} blocks of {block_bytes} bytes)")
    return unpack(raw.reshape(n_blocks, block_bytes)).reshape(shape)
