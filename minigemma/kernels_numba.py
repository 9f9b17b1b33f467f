"""The Numba backend: compiled twins of the reference's hot operations (layers.py), same signatures, same answers.

Chosen by `minigemma.load(..., backend="numba")` or `--backend numba` (the command line's default); kernels.py
makes the Backend value from the functions here. This module imports the reference (to mirror it and to fall
back on it), never the dispatcher. Only these get a twin:

    linear(x, w)        one-token products (decode): a matrix-vector kernel per weight type (float32,
                        bfloat16/float16, and int8/int4 in the packed layouts of packed.py, Int8x64 and
                        Int4x64), reading each weight once (int8 and int4: products in integers)
                        many-token products (prefill): weights dequantized a cache-sized tile at a time
                        into float32, then BLAS sgemm (x @ tile): a hand-written GEMM rarely beats BLAS
    linears(x, *ws)     q, k, v (or gate, up) of a decode step: one matrix-vector kernel call over all of them
    linear_backward(..) training's dx = dy W for a frozen int8/int4 weight (QLoRA): the same tiles, dy @ tile.T
    attention(...)      an online softmax over tiles of keys (the flash-attention idea), so no (T, S) score
                        matrix is built, and a sliding-window layer only visits the keys inside its window:
                        for decode a Numba kernel per (kv head, range of keys), each key read once for
                        the query heads that share it; for a few queries one per (head, tile of queries);
                        from 32 queries on (prefill) the same recurrence on 128 x 512 blocks whose
                        products are sgemm calls (NumPy)
    rms_norm(x, w, eps) one pass per row (decode makes ~110 of these small calls per token)
    apply_rope(x, c, s) one pass (decode rotates q and k of every layer: 36 small calls per token for the 270M)
    geglu(g, u)         gelu_tanh(g) * u in one vector pass (exp_f32 for the tanh), where NumPy made nine

Which threads: decode's kernels run `prange` loops on Numba's threads; prefill's products run on OpenBLAS's,
so the kernels used in prefill (tiles, RMSNorm, RoPE) stay on one thread, and importing minigemma (__init__.py)
makes OpenBLAS's worker stop spinning soon after its work (docs/kernels.md, "Threads").

Rules the kernels follow (docs/kernels.md):
  * each has a header with the math and the shapes, like the NumPy twin it mirrors;
  * `prange` only over independent outputs (blocks of rows, heads); no exceptions or globals inside;
  * arithmetic is float32 (exceptions: rms_norm_rows sums its squares in float64; int8 decode multiplies
    16-bit integer halves of the activations and int4 decode their three signed bytes, exact in integers,
    then goes on in float32: split_activations, split_digits);
  * no LLVM code written by hand except where Numba's loops do not reach the instructions: `pair_sums`
    (`vpmaddwd`), `digit_sums` (`vpmaddubsw`, named where the CPU has AVX2: the one x86 instruction named),
    `prefetch` and `widen_pair` (stride-2 bytes), each a NumPy function that a compiled kernel gets as LLVM IR
    (@overload);
  * fastmath is limited to reassociation and contraction (FMA): sums may be reordered (float32 summation
    order tolerance), but -inf, NaN and division keep their meaning (the attention mask relies on -inf);
  * `cache=True`: compiled once, stored in __pycache__, reloaded by later processes.

NUMBA_DISABLE_JIT=1 turns every kernel back into plain Python over NumPy arrays (pair_sums, digit_sums,
prefetch and widen_pair into their NumPy versions): slow, but a debugger can step through it line by line
(docs/kernels.md).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import layers as reference
from .packed import ROWS, Int4x64, Int8x64
from .weights import GROUP, Float16Bits, Int4, Int8, LoRA

f32 = np.float32
FAST = {"reassoc", "contract"}  # reorder sums, fuse multiply-adds; nothing that changes -inf or NaN
MATVEC_MAX_T = 8  # float32 and 16-bit weights: up to this many tokens a matrix-vector kernel, each row read once and
# dotted with every token; more: BLAS sgemm (float32), or tiles widened by NumPy (16-bit)
PACKED_MATVEC_MAX_T = 16  # int8 and int4: up to this many tokens the matrix-vector kernel (each block of weights
# read from cache for every token, no dequantizing); more: dequantized tiles and sgemm. At 16 tokens the kernel
# took 1/1.6 to 1/3.4 of the tiles' time on the 270M's matrices, LM head included; at 32 from 0.8x to 2x as
# fast, at 64 even (AMD EPYC; the bound was 8 before issue 19's fourth session)
TILE_BYTES = 1 << 23  # float32 bytes of one dequantized tile for prefill's sgemm: 8 MiB (in L3), so that the 270M's
# MLP matrices are one tile each; sgemm ran ~10% faster on (500, 640) @ (640, 2048) than on two 1024-wide halves,
# and a 500-token int8 prefill ~4% faster than with 4 MiB tiles (AMD EPYC, docs/performance.md)


# ---- fp16 scales ----------------------------------------------------------------------------------------------

@njit(inline="always", cache=True)
def fp16_to_f32(bits, out):
    """Widen float16 bit patterns (uint16) to float32, as the CPU's vcvtph2ps would (finite values only).

    Numba has no float16 arithmetic on the CPU, so this is the classic bit trick: put the 5 exponent and
    10 mantissa bits where a float32 keeps its own, then multiply by 2^112 to move the exponent bias from
    15 to 127 (which also turns fp16 subnormals into the right normal float32); the sign goes back last.

    Shapes: (N,) uint16, (N,) float32 out
    """
    u = out.view(np.uint32)
    for i in range(bits.shape[0]):
        u[i] = (np.uint32(bits[i]) & np.uint32(0x7FFF)) << np.uint32(13)
    for i in range(bits.shape[0]):
        out[i] *= f32(2.0 ** 112)
    for i in range(bits.shape[0]):
        u[i] |= (np.uint32(bits[i]) & np.uint32(0x8000)) << np.uint32(16)


# ---- matrix-vector products (decode) --------------------------------------------------------------------------

@njit(cache=True)
def _which(sizes, job):
    """The matrix m and its block b that global block `job` is, blocks numbered through the matrices in order."""
    m, b = 0, np.int64(job)  # signed: a prange index is unsigned, and unsigned - signed is a float in Numba
    while b >= sizes[m]:
        b -= sizes[m]
        m += 1
    return m, b


# int8 weights times float32 activations in integers. Widening every weight to float32 costs a conversion
# per weight, and on CPUs with 256-bit vectors that, not memory, bounded the int8 product (issue 19: an AMD
# EPYC Zen 3 and an Intel Xeon). So each group of 32 activations is split, exactly enough for float32, into
# two 16-bit integers per element, and the weights are multiplied with them as 16-bit integers: x86's
# `vpmaddwd` multiplies 16 pairs and adds each pair, one instruction for 8 rows x 2 inputs.
#     x[j] ~ m * 2^-29 * (32768 h[j] + l[j]),   m = max |x| over the group,  h in [-2^14, 2^14],  l in [0, 2^15)
# The split's error is at most m * 2^-30 per element (and two float64 roundings): about 2^-6 of float32's own
# rounding of the largest input. The sums are exact in int32 (|sum q h| <= 2^26, |sum q l| < 2^27); one
# conversion to float per group and row.

SPLIT = 2.0 ** 29  # m maps to this integer: 30 bits of the group's largest input, in a 15-bit top and bottom


@njit(fastmath=FAST, cache=True)
def split_activations(x, halves, tops):
    """halves[t, g] = (h[0..31], l[0..31]) and tops[t, g] = m for x[t, 32g:32g+32], as above (float64 inside).

    A group holding inf or NaN gets m = NaN and zero halves: its products come out NaN.
    Shapes: x (T, in) float32, halves (T, G, 64) int16, tops (T, G) float32
    """
    for t in range(x.shape[0]):
        for g in range(tops.shape[1]):
            m, finite = 0.0, True
            for j in range(GROUP):
                value = np.float64(x[t, g * GROUP + j])
                m = max(m, abs(value))
                finite &= math.isfinite(value)
            tops[t, g] = f32(m) if finite else f32(np.nan)
            if not finite or m == 0:
                halves[t, g, :] = 0
                continue
            inverse = SPLIT / m
            for j in range(GROUP):
                whole = np.int32(np.rint(np.float64(x[t, g * GROUP + j]) * inverse))  # |whole| <= 2^29
                top = whole >> 15
                halves[t, g, j] = top
                halves[t, g, GROUP + j] = whole - (top << 15)


def pair_sums(q, at, halves, x_at, m, d, d_at, acc, c):
    """acc[c + r] += (((32768 * H[r] + L[r]) * 2^-29) * d[d_at + r]) * m for the 8 rows r < 8 (float32, in this
    order; d holds fp16 bit patterns, m is the group's largest |x|),
    where H[r] = sum_{p,k} q[at + 128p + 2r + k] * halves[x_at + 2p + k] and L[r] the same with
    halves[x_at + 32 + 2p + k]: the int32 dot products of 8 rows of one group (Int8x64: 16 pairs of inputs,
    each 64 rows x 2; `at` points at the first of the 8 rows) with the group's tops h and bottoms l.
    (NumPy; compiled, _pair_sums_ir: the same numbers.)

    Shapes: q int8, halves int16 and d uint16, contiguous, read flat from `at`, `x_at`, `d_at`; acc (64,) float32"""
    starts = at + 2 * ROWS * np.arange(GROUP // 2)  # pair p of row 0
    w = q.reshape(-1)[starts[:, None] + np.arange(16)].reshape(GROUP // 2, 8, 2).astype(np.int32)  # (p, r, k)
    xs = halves.reshape(-1)[x_at:x_at + 2 * GROUP].astype(np.int32).reshape(2, GROUP // 2, 2)  # (h/l, p, k)
    top, bottom = (np.einsum("prk,pk->r", w, xs[i]).astype(f32) for i in (0, 1))  # exact: |sums| < 2^27
    scale = d.reshape(-1)[d_at:d_at + 8].view(np.float16).astype(f32)
    acc[c:c + 8] += (f32(32768) * top + bottom) * f32(1 / SPLIT) * scale * f32(m)


_V8, _V16 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(32), 16)
_F8, _F16 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.FloatType(), 16)
_I32 = ir.IntType(32)


def _element_pointer(context, builder, array_type, array, offset, to):
    """A pointer to element `offset` of a contiguous array, cast to `to`*."""
    data = cgutils.create_struct_proxy(array_type)(context, builder, value=array).data
    return builder.bitcast(builder.gep(data, [offset]), to.as_pointer())


def _broadcast(builder, value, vector_type):
    """`value` in every lane of a vector of `vector_type` (insert into lane 0, then shuffle lane 0 everywhere)."""
    lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    everywhere = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(lane0, lane0, everywhere)


def _fp16_rows(context, builder, array_type, array, at):
    """8 fp16 bit patterns (uint16) from element `at` of `array`, as <8 x float>: LLVM's `fpext` from half where the
    target has F16C (`vcvtph2ps`, one instruction), else fp16_to_f32's bit trick in IR, exponent and mantissa moved
    up, rebiased by a multiply by 2^112, then the sign (without F16C LLVM's `fpext` needs a library function the
    JIT does not have). The same numbers either way: every finite fp16 is a float32."""
    if _target_has(context, "f16c"):
        halves = _element_pointer(context, builder, array_type, array, at, ir.VectorType(ir.HalfType(), 8))
        return builder.fpext(builder.load(halves, align=2), _F8)
    eight = ir.VectorType(ir.IntType(16), 8)
    bits = builder.zext(builder.load(_element_pointer(context, builder, array_type, array, at, eight), align=2), _V8)
    magnitude = builder.shl(builder.and_(bits, ir.Constant(_V8, [0x7FFF] * 8)), ir.Constant(_V8, [13] * 8))
    magnitude = builder.fmul(builder.bitcast(magnitude, _F8), ir.Constant(_F8, [2.0 ** 112] * 8))
    sign = builder.shl(builder.and_(bits, ir.Constant(_V8, [0x8000] * 8)), ir.Constant(_V8, [16] * 8))
    return builder.bitcast(builder.or_(builder.bitcast(magnitude, _V8), sign), _F8)


def _target_has(context, feature: str) -> bool:
    """Whether the CPU Numba compiles for has `feature` (LLVM's name: "avx2", "f16c"): the host's, or what
    NUMBA_CPU_FEATURES says (the feature string Numba made its target machine with)."""
    return f"+{feature}" in context.codegen()._tm_features.split(",")


def prefetch(a, i):
    """A hint, no result: start bringing the cache line of a.flat[i] in from memory (NumPy: nothing to do).

    The matrix-vector kernels read their weights once, front to back; asking for the bytes a few KB ahead
    keeps more of memory's requests in flight than the CPU's own prefetchers did on the AMD EPYC Zen 3 (the
    int8 LM head streamed 16-19 GB/s without it, 24-26 with it, float32 27-30). An address past the end of
    `a` is harmless: a prefetch never faults."""


@intrinsic
def _prefetch_ir(typingctx, a, i):
    sig = types.void(a, types.int64)

    def codegen(context, builder, signature, args):
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
        builder.call(hint, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])  # read, keep
        return context.get_dummy_value()

    return sig, codegen


@overload(prefetch, inline="always")
def _prefetch_compiled(a, i):
    if isinstance(a, types.Array) and a.layout == "C":
        return lambda a, i: _prefetch_ir(a, i)
    return None


AHEAD = 4096  # bytes of weights ahead of the ones read that prefetch asks for (4, 8, 16 KB: the same on Zen 3).
# Only the int8 kernel asks: the int4 kernel, bound by its arithmetic on the Zen 3, ran no faster with it.


@intrinsic
def _pair_sums_ir(typingctx, q, at, halves, x_at, m, d, d_at, acc, c):
    """pair_sums written as LLVM vector code (Numba's own loops do not become `vpmaddwd`; docs/kernels.md).

    Per pair p: 16 bytes of q (8 rows x 2 inputs) sign-extended, times the pair (h[2p], h[2p+1]) broadcast,
    the products of neighbours added (`mul`, then even + odd lanes: the shape LLVM's x86 backend turns into
    one `vpmaddwd`, and which other CPUs compute as written); the same for l with the same 16 weights. Then
    one conversion to float32 per 8 sums, the 8 scales widened from fp16 by fp16_to_f32's bit trick (LLVM's
    own `fpext` from half needs F16C on x86, or a library call the JIT does not have), and acc's 8 rows
    updated: the float operations in the twin's order (inside a kernel compiled with FAST, LLVM may fuse a
    multiply and an add, so there the bits may differ from the twin's)."""
    sig = types.void(q, types.int64, halves, types.int64, types.float32, d, types.int64, acc, types.int64)

    def codegen(context, builder, signature, args):
        q, at, halves, x_at, m, d, d_at, acc, c = args
        q_ty, _, halves_ty, _, _, d_ty, _, acc_ty, _ = signature.args
        weights = _element_pointer(context, builder, q_ty, q, at, ir.VectorType(ir.IntType(8), 16))
        pairs = _element_pointer(context, builder, halves_ty, halves, x_at, _I32)  # (h, h') as one 32-bit word
        even, odd = ir.Constant(_V8, list(range(0, 16, 2))), ir.Constant(_V8, list(range(1, 16, 2)))
        total = [ir.Constant(_V8, [0] * 8)] * 2
        for p in range(GROUP // 2):
            pair_p = ir.Constant(_I32, p * 2 * ROWS // 16)  # 128p bytes on: pair p of the first row, in 16s
            w = builder.sext(builder.load(builder.gep(weights, [pair_p]), align=1), _V16)
            for which in (0, 1):  # h, then l
                word = builder.load(builder.gep(pairs, [ir.Constant(_I32, which * GROUP // 2 + p)]))
                lanes = _broadcast(builder, word, _V8)  # the pair in all 8 lanes
                x = builder.sext(builder.bitcast(lanes, ir.VectorType(ir.IntType(16), 16)), _V16)
                products = builder.mul(w, x)
                neighbours = builder.add(builder.shuffle_vector(products, products, even),
                                         builder.shuffle_vector(products, products, odd))
                total[which] = builder.add(total[which], neighbours)
        top, bottom = (builder.sitofp(t, _F8) for t in total)
        term = builder.fadd(builder.fmul(ir.Constant(_F8, [32768.0] * 8), top), bottom)
        term = builder.fmul(term, ir.Constant(_F8, [1 / SPLIT] * 8))
        scales = _fp16_rows(context, builder, d_ty, d, d_at)
        term = builder.fmul(builder.fmul(term, scales), _broadcast(builder, m, _F8))
        rows = _element_pointer(context, builder, acc_ty, acc, c, _F8)
        builder.store(builder.fadd(builder.load(rows, align=4), term), rows, align=4)
        return context.get_dummy_value()

    return sig, codegen


@overload(pair_sums, inline="always")
def _pair_sums_compiled(q, at, halves, x_at, m, d, d_at, acc, c):
    if all(isinstance(a, types.Array) and a.layout == "C" for a in (q, halves, d, acc)) \
            and (q.dtype, halves.dtype, d.dtype, acc.dtype) == (types.int8, types.int16, types.uint16, types.float32):
        return lambda q, at, halves, x_at, m, d, d_at, acc, c: _pair_sums_ir(q, at, halves, x_at, m, d, d_at, acc, c)
    return None


@njit(parallel=True, fastmath=FAST, cache=True)
def int8x64_matvec(x, qs, ds, outs):
    """outs[m][t, 64b + r] = sum_g d[b, g, r] * sum_j q[b, g, j, r] * x[t, 32g + j],  (q, d) = (qs[m], ds[m])

    (Int8x64 @ x, for each matrix m of a tuple: the products of one input with q, k and v, or with gate and up,
    in one parallel loop over all their blocks; one matrix is a tuple of one.)
    The activations are split into 16-bit halves once (split_activations); then per block of 64 rows, group
    of 32 inputs and 8 rows, pair_sums gives the int32 sums against the tops and the bottoms, and
        sum_j q x ~ m * 2^-29 * (32768 * sum_j q h + sum_j q l)
    in float32, times the rows' scales (int8_block). Each thread takes whole blocks; a block (in * 64 bytes)
    stays in cache while it serves every token of x.

    Shapes: x (T, in), qs[m] (B_m, G, 16, 64, 2) int8 (q[b, g, j, r] above is qs[m][b, g, j // 2, r, j % 2]),
            ds[m] (B_m, G, 64) uint16 (fp16 bits), outs[m] (T, B_m*64)
    """
    sizes = np.array([q.shape[0] for q in qs])
    halves, tops = int8_inputs(x, qs[0].shape[1])
    for job in prange(sizes.sum()):
        m, b = _which(sizes, job)
        int8_block(halves, tops, qs[m], ds[m], b, outs[m])


@njit(fastmath=FAST, cache=True)
def int8_inputs(x, G):
    """x as int8_block reads it: halves (T, G, 64) int16 and tops (T, G) float32 (split_activations)."""
    halves = np.empty((x.shape[0], G, 2 * GROUP), np.int16)
    tops = np.empty((x.shape[0], G), f32)
    split_activations(x, halves, tops)
    return halves, tops


@njit(inline="always", fastmath=FAST, cache=True)
def int8_block(halves, tops, q, d, b, out):
    """out[t, 64b:64b+64] for every token t: block b of one Int8x64 matrix (q, d) times the split activations.
    Shapes: as int8x64_matvec, for one matrix"""
    T, G = tops.shape
    acc = np.empty(ROWS, f32)
    for t in range(T):
        acc[:] = 0
        for g in range(G):
            at = (b * G + g) * GROUP * ROWS  # q[b, g], 2048 bytes
            for c in range(0, ROWS, 8):  # 8 rows at a time: 2 x 8 int32 sums, in vector registers
                for line in range(4):  # the 2048 bytes AHEAD of this group's, 256 per pass
                    prefetch(q, at + AHEAD + 32 * c + 64 * line)
                pair_sums(q, at + 2 * c, halves, (t * G + g) * 2 * GROUP, tops[t, g], d, (b * G + g) * ROWS + c,
                          acc, c)
        out[t, b * ROWS:(b + 1) * ROWS] = acc


# int4 weights times float32 activations in integers too, with bytes where int8 takes 16-bit halves. A nibble
# q (0..15) is an unsigned byte, and x86's `vpmaddubsw` multiplies 32 unsigned bytes with 32 signed ones and adds
# neighbours into 16-bit sums: 32 products per instruction, where the float route (widen, convert, split the
# byte, two multiply-adds per two weights) was compute-bound on the AMD EPYC Zen 3. So each group of 32
# activations is written in three signed bytes per element (digits),
#     x[j] ~ s * (65536 D2[j] + 256 D1[j] + D0[j]),   s = m / DIGITS,  m = max |x| over the group,  each D in -128..127
# (X = rint(x / s), |X| <= DIGITS = 127 * (65536 + 256 + 1), cut into balanced base-256 digits). The error is
# at most s / 2 ~ m 2^-24 per element: float32's own rounding of the largest input, so the products stay within
# the float32 summation-order bound of the tests (measured: 1e-3 of it, where the float route used 6e-3).
# Each digit's products with a group's nibbles are exact 16-bit sums (|sum| <= 8 * 2 * 15 * 128 = 30720).

DIGITS = 127 * (65536 + 256 + 1)  # m maps to this integer: the largest three balanced signed bytes hold


@njit(fastmath=FAST, cache=True)
def split_digits(x, digits, steps, sums):
    """digits[t, g, :, j] = (D2, D1, D0) of x[t, 32g + j] as above, steps[t, g] = s = m / DIGITS (float64 inside,
    then float32) and sums[t, g] = the group's sum of x (float32, for the minima: sum_j (d q_j + m) x_j).

    A group holding inf or NaN gets s = NaN and zero digits: its products come out NaN.
    Shapes: x (T, in) float32, digits (T, G, 3, 32) int8, steps, sums (T, G) float32
    """
    biased = np.empty(GROUP, np.int32)
    for t in range(x.shape[0]):
        for g in range(steps.shape[1]):
            m, finite, total = f32(0), True, f32(0)
            for j in range(GROUP):  # loops without branches, over 32 lanes: vector code
                value = x[t, g * GROUP + j]
                m = max(m, abs(value))  # exact in float32
                finite &= math.isfinite(value)
                total += value
            sums[t, g] = total
            steps[t, g] = f32(np.float64(m) / DIGITS) if finite else f32(np.nan)
            if not finite or m == 0:
                digits[t, g] = 0
                continue
            inverse = DIGITS / np.float64(m)
            # X + 128 (65536 + 256 + 1) is in [0, 2^24), and its three bytes are D2 + 128, D1 + 128, D0 + 128; a
            # byte b XOR 128, read as a signed byte, is b - 128: so the bytes of that XOR 0x808080 are the digits
            for j in range(GROUP):
                whole = np.int32(np.rint(np.float64(x[t, g * GROUP + j]) * inverse))  # X, |X| <= DIGITS
                biased[j] = (whole + np.int32(128 * (65536 + 256 + 1))) ^ np.int32(0x808080)
            for k in range(3):
                for j in range(GROUP):
                    digits[t, g, 2 - k, j] = np.int8(biased[j] >> np.int32(8 * k))  # its low byte


def digit_sums(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c):
    """acc[c + r] += (((65536 A2[r] + (256 A1[r] + A0[r])) * step) * d[d_at + r]) + mins[d_at + r] * xsum for the 8
    rows r < 8 (float32, in this order; d and mins hold fp16 bit patterns), where A_k[r] is the int32 dot product
    of row r's group of nibbles with the group's digit k: Int4x64's 4 chunks of 8 rows x 4 bytes at nibbles[at +
    256 i + 4 r + j], low nibble input 4i + j, high nibble 16 + 4i + j (`at` points at the first of the 8 rows);
    digits[x_at + 32 k + input] (D2, D1, D0: split_digits).
    (NumPy; compiled, _digit_sums_ir: the same numbers.)

    Shapes: nibbles, digits int8/uint8, d and mins uint16, contiguous, read flat; acc (64,) float32"""
    rows = nibbles.reshape(-1)[at + 256 * np.arange(4)[:, None, None] + 4 * np.arange(8)[:, None] + np.arange(4)]
    q = np.concatenate([rows & 15, rows >> 4]).astype(np.int64)  # (8, 8, 4): (low/high, chunk), row, byte
    x = digits.reshape(-1)[x_at:x_at + 3 * GROUP].astype(np.int64).reshape(3, 2, 4, 4)  # digit, low/high, chunk, j
    a2, a1, a0 = (np.einsum("irj,ij->r", q, x[k].reshape(8, 4)) for k in range(3))  # exact
    total = f32(65536) * a2.astype(f32) + (256 * a1 + a0).astype(f32)  # 256 A1 + A0 < 2^24: exact in float32
    scale, low = (a.reshape(-1)[d_at:d_at + 8].view(np.float16).astype(f32) for a in (d, mins))
    acc[c:c + 8] += (total * f32(step)) * scale + low * f32(xsum)


_B32, _H16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)


def _byte_pair_sums(builder, unsigned, signed, native: bool):
    """<32 x i8> unsigned bytes times <32 x i8> signed ones, neighbours added: <16 x i16>. With `native`, x86's
    `vpmaddubsw` (AVX2), named: LLVM forms it only from a saturating pattern, and it drops the saturation (and
    then the instruction) when it can prove the sums small, as here. Otherwise the same sums in plain IR, which
    any CPU computes (they never reach the saturation: 2 * 15 * 128)."""
    if native:
        call = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_H16, [_B32, _B32]),
                                              "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(call, [unsigned, signed])
    products = builder.mul(builder.zext(unsigned, ir.VectorType(ir.IntType(16), 32)),
                           builder.sext(signed, ir.VectorType(ir.IntType(16), 32)))
    lanes = [ir.Constant(_V16, list(range(k, 32, 2))) for k in (0, 1)]
    return builder.add(*(builder.shuffle_vector(products, products, lane) for lane in lanes))


def _make_digit_sums_ir(native: bool | None):
    """digit_sums as LLVM vector code; `native` None: vpmaddubsw where the target has AVX2 (tests force either)."""

    @intrinsic
    def _digit_sums_ir(typingctx, nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c):
        """Per chunk i: 32 bytes (8 rows x 4), the low nibbles masked and the high ones shifted down, each times
        its 4 inputs' digits broadcast (one 32-bit word), 16-bit sums per digit in registers across the group;
        then per digit the neighbours (a row's two byte pairs) added into int32 (`vpmaddwd` by ones), and the
        float part in the twin's order."""
        sig = types.void(nibbles, types.int64, digits, types.int64, types.float32, d, mins, types.int64,
                         types.float32, acc, types.int64)

        def codegen(context, builder, signature, args):
            nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c = args
            nibbles_ty, _, digits_ty, _, _, d_ty, mins_ty, _, _, acc_ty, _ = signature.args
            use_x86 = _target_has(context, "avx2") if native is None else native
            chunks = _element_pointer(context, builder, nibbles_ty, nibbles, at, _B32)  # 8 rows x 4 bytes
            words = _element_pointer(context, builder, digits_ty, digits, x_at, _I32)  # 4 inputs' digits
            fifteen, four = ir.Constant(_B32, [15] * 32), ir.Constant(_B32, [4] * 32)
            sums = [ir.Constant(_H16, [0] * 16)] * 3
            for i in range(4):
                w = builder.load(builder.gep(chunks, [ir.Constant(_I32, i * 8)]), align=1)  # 256 bytes a chunk
                halves = (builder.and_(w, fifteen), builder.and_(builder.lshr(w, four), fifteen))
                for k in range(3):
                    for high, nibble in enumerate(halves):
                        word = builder.load(builder.gep(words, [ir.Constant(_I32, 8 * k + 4 * high + i)]))
                        x = builder.bitcast(_broadcast(builder, word, _V8), _B32)
                        sums[k] = builder.add(sums[k], _byte_pair_sums(builder, nibble, x, use_x86))
            even, odd = ir.Constant(_V8, list(range(0, 16, 2))), ir.Constant(_V8, list(range(1, 16, 2)))
            a2, a1, a0 = (builder.add(*(builder.shuffle_vector(wide, wide, lane) for lane in (even, odd)))
                          for wide in (builder.sext(s, _V16) for s in sums))
            low_part = builder.add(builder.mul(a1, ir.Constant(_V8, [256] * 8)), a0)
            total = builder.fadd(builder.fmul(ir.Constant(_F8, [65536.0] * 8), builder.sitofp(a2, _F8)),
                                 builder.sitofp(low_part, _F8))
            scales, lows = (_fp16_rows(context, builder, ty, a, d_at) for ty, a in ((d_ty, d), (mins_ty, mins)))
            term = builder.fmul(builder.fmul(total, _broadcast(builder, step, _F8)), scales)
            term = builder.fadd(term, builder.fmul(lows, _broadcast(builder, xsum, _F8)))
            rows = _element_pointer(context, builder, acc_ty, acc, c, _F8)
            builder.store(builder.fadd(builder.load(rows, align=4), term), rows, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return _digit_sums_ir


_digit_sums_ir = _make_digit_sums_ir(None)


@overload(digit_sums, inline="always")
def _digit_sums_compiled(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c):
    if all(isinstance(a, types.Array) and a.layout == "C" for a in (nibbles, digits, d, mins, acc)) \
            and (nibbles.dtype, digits.dtype, d.dtype, mins.dtype, acc.dtype) == (
                types.uint8, types.int8, types.uint16, types.uint16, types.float32):
        return lambda nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c: _digit_sums_ir(
            nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c)
    return None


@njit(parallel=True, fastmath=FAST, cache=True)
def int4x64_matvec(x, nibble_s, ds, ms, outs):
    """outs[m][t, 64b + r] = sum_g d[b, g, r] * sum_j q[b, g, j, r] * x[t, 32g + j] + m[b, g, r] * sum_j x[t, 32g + j]

    (Int4x64 @ x, for each matrix of a tuple, as int8x64_matvec.) The activations are split into three signed
    bytes once (split_digits); then per block of 64 rows, group of 32 inputs and 8 rows, digit_sums gives the
    int32 sums of the nibbles against each digit (vpmaddubsw on x86), and
        sum_j q x ~ s * (65536 A2 + 256 A1 + A0)
    in float32, times the rows' scales; the group's minimum m times the sum of its 32 inputs, made once per
    token for all rows (int4_block). On the AMD EPYC Zen 3 this took 0.65-0.75 of the time of the float route it
    replaced (docs/kernels.md).

    Shapes: x (T, in), nibble_s[m] (B_m, G, 4, 64, 4) uint8 (q[b, g, j, r] above is a nibble of
            nibble_s[m][b, g, (j % 16) // 4, r, j % 4]: the low one for j < 16), ds[m], ms[m] (B_m, G, 64) uint16
            (fp16 bits), outs[m] (T, B_m*64)
    """
    sizes = np.array([n.shape[0] for n in nibble_s])
    digits, steps, sums = int4_inputs(x, nibble_s[0].shape[1])
    for job in prange(sizes.sum()):
        which, b = _which(sizes, job)
        int4_block(digits, steps, sums, nibble_s[which], ds[which], ms[which], b, outs[which])


@njit(fastmath=FAST, cache=True)
def int4_inputs(x, G):
    """x as int4_block reads it: digits (T, G, 3, 32) int8, steps and sums (T, G) float32 (split_digits)."""
    digits = np.empty((x.shape[0], G, 3, GROUP), np.int8)
    steps, sums = np.empty((x.shape[0], G), f32), np.empty((x.shape[0], G), f32)
    split_digits(x, digits, steps, sums)
    return digits, steps, sums


@njit(inline="always", fastmath=FAST, cache=True)
def int4_block(digits, steps, sums, nibbles, d, m, b, out):
    """out[t, 64b:64b+64] for every token t: block b of one Int4x64 matrix (nibbles, d, m) times the split
    activations. Shapes: as int4x64_matvec, for one matrix"""
    T, G = steps.shape
    acc = np.empty(ROWS, f32)
    for t in range(T):
        acc[:] = 0
        for g in range(G):
            at = (b * G + g) * (GROUP // 2) * ROWS  # nibbles[b, g], 1024 bytes
            for c in range(0, ROWS, 8):  # 8 rows at a time: 3 x 16 16-bit sums, in vector registers
                prefetch(nibbles, at + AHEAD + 16 * c)  # the 1024 bytes AHEAD of this group's, 128 per pass
                prefetch(nibbles, at + AHEAD + 16 * c + 64)
                digit_sums(nibbles, at + 4 * c, digits, (t * G + g) * 3 * GROUP, steps[t, g], d, m,
                           (b * G + g) * ROWS + c, sums[t, g], acc, c)
        out[t, b * ROWS:(b + 1) * ROWS] = acc


@njit(parallel=True, fastmath=FAST, cache=True)
def mixed_matvec(x, qs, ds, outs, nibble_s, ds4, ms, outs4):
    """int8x64_matvec and int4x64_matvec in one parallel loop: the blocks of the int8 matrices (qs, ds -> outs),
    then those of the int4 ones (nibble_s, ds4, ms -> outs4). The int4 load of a Q4_K_M file keeps v_proj in
    int8 (the file's Q6_K), so q, k and v are two kinds: as three kernel calls they took 75.5-78.1 us a layer,
    in one loop 63.9-66.0 (AMD EPYC Zen 3, docs/kernels.md).

    Shapes: as int8x64_matvec's and int4x64_matvec's"""
    sizes8 = np.array([q.shape[0] for q in qs])
    sizes4 = np.array([n.shape[0] for n in nibble_s])
    halves, tops = int8_inputs(x, qs[0].shape[1])
    digits, steps, sums = int4_inputs(x, nibble_s[0].shape[1])
    n8 = sizes8.sum()
    for job in prange(n8 + sizes4.sum()):
        j = np.int64(job)  # signed, as in _which
        if j < n8:
            m, b = _which(sizes8, j)
            int8_block(halves, tops, qs[m], ds[m], b, outs[m])
        else:
            m, b = _which(sizes4, j - n8)
            int4_block(digits, steps, sums, nibble_s[m], ds4[m], ms[m], b, outs4[m])


@njit(parallel=True, fastmath=FAST, cache=True)
def f16bits_matvec(x, bits, bfloat16, out):
    """out[t, o] = sum_i w[o, i] * x[t, i], w stored as 16-bit patterns (bfloat16 or float16)   (Float16Bits @ x)

    A row is widened into a float32 buffer (bfloat16: the bits shifted into the top half; float16: the bit
    trick of fp16_to_f32), then dotted with each token; the sum runs along the row and is reassociated
    into vector lanes. Threads take blocks of 64 rows.

    Shapes: x (T, in), bits (out, in) uint16, out (T, out)
    """
    O, I = bits.shape
    for b in prange((O + ROWS - 1) // ROWS):
        row = np.empty(I, f32)
        for o in range(b * ROWS, min(O, (b + 1) * ROWS)):
            if bfloat16:
                u = row.view(np.uint32)
                for i in range(I):
                    u[i] = np.uint32(bits[o, i]) << np.uint32(16)
            else:
                fp16_to_f32(bits[o], row)
            for t in range(x.shape[0]):
                s = f32(0)
                for i in range(I):
                    s += row[i] * x[t, i]
                out[t, o] = s


@njit(parallel=True, fastmath=FAST, cache=True)
def f32_matvec(x, w, out):
    """out[t, o] = sum_i w[o, i] * x[t, i]                                                    (float32 w @ x)

    BLAS's sgemv does the same as fast on an idle machine; this one exists so that decoding runs on Numba's
    threads only (kernels_numba.choose_threads), not also on OpenBLAS's, whose waiting threads cost a
    scheduler time slice per call when the machine is busy (docs/kernels.md, "Threads").

    Shapes: x (T, in), w (out, in) float32, out (T, out)
    """
    O, I = w.shape
    for b in prange((O + ROWS - 1) // ROWS):
        for o in range(b * ROWS, min(O, (b + 1) * ROWS)):
            for t in range(x.shape[0]):
                s = f32(0)
                for i in range(I):
                    s += w[o, i] * x[t, i]
                out[t, o] = s


# ---- RMSNorm --------------------------------------------------------------------------------------------------

@njit(fastmath=FAST, cache=True)
def rms_norm_rows(x, weight, eps, out):
    """out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * (1 + weight)                  (layers.rms_norm, row by row)

    One pass per row instead of NumPy's five (square, mean, sqrt, divide, scale), and no Python between them:
    a decode step makes ~110 of these calls on 640 numbers, where NumPy's per-call overhead is most of the
    cost. One thread: in prefill a second thread would share its core with OpenBLAS's spinning worker.

    Shapes: x (M, N) float32, weight (N,) float32, out (M, N) float32
    """
    M, N = x.shape
    for m in range(M):
        total = 0.0  # float64: the mean square rounded once, as close to NumPy's pairwise sum as it gets
        for i in range(N):
            total += np.float64(x[m, i]) * np.float64(x[m, i])
        rms = np.sqrt(f32(total / N) + f32(eps))
        for i in range(N):
            out[m, i] = x[m, i] / rms * (f32(1) + weight[i])


# ---- RoPE -----------------------------------------------------------------------------------------------------

@njit(fastmath=FAST, cache=True)
def rope_rows(x, cos, sin, out):
    """out[n, t, i]        = x[n, t, i] cos[t, i]               - x[n, t, i + Dh/2] sin[t, i]
       out[n, t, i + Dh/2] = x[n, t, i + Dh/2] cos[t, i + Dh/2] + x[n, t, i] sin[t, i + Dh/2]   (layers.apply_rope)

    The split-half rotation in one pass, where NumPy makes five (a product, two slices, two updates): a decode
    step rotates q and k of every layer, 36 small calls for the 270M, most of whose NumPy time was per-call
    overhead. x may be a strided view (Gemma 1/2 rotate the transposed projection). One thread, as rms_norm_rows.

    Shapes: x (N, T, Dh), cos, sin (T, Dh), out (N, T, Dh) float32
    """
    N, T, Dh = x.shape
    half = Dh // 2
    for n in range(N):
        for t in range(T):
            for i in range(half):
                a, b = x[n, t, i], x[n, t, i + half]
                out[n, t, i] = a * cos[t, i] - b * sin[t, i]
                out[n, t, i + half] = b * cos[t, i + half] + a * sin[t, i + half]


# ---- the MLP's activation -------------------------------------------------------------------------------------

def as_f32(bits):
    """The float32 whose bit pattern is the int32 `bits` (NumPy: a view; compiled, _as_f32_ir: LLVM's bitcast)."""
    return np.array(bits, np.int32).view(f32)[()]


@intrinsic
def _as_f32_ir(typingctx, bits):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@overload(as_f32, inline="always")
def _as_f32_compiled(bits):
    if isinstance(bits, types.Integer):  # Numba widens int32 arithmetic to int64: back to 32 bits here
        return lambda bits: _as_f32_ir(np.int32(bits))
    return None


LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 = LN2_HIGH + LN2_LOW: LN2_HIGH has 9 significant bits,
# so k * LN2_HIGH is exact for |k| < 2^15 (Cody and Waite's reduction, as Cephes' expf)
ROUNDING = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 below 2^22 to an integer


@njit(inline="always", fastmath={"contract"}, cache=True)
def exp_f32(z):
    """e^z in float32 within about 1 ulp of the exact value, for z in [-87, 88] (e^-87 is still a normal float32,
    e^88 still finite); 0 below -87 (e^-inf = 0: a masked score), e^88 above. e^z = 2^k e^r with
    k = round(z / ln 2) and r = z - k ln 2 in [-ln 2/2, ln 2/2], e^r by Cephes' expf polynomial (S. Moshier,
    Cephes Math Library), 2^k built as a float's bit pattern (as_f32). Only arithmetic, a bitcast and selects,
    so a loop calling it becomes vector code, where math.exp is a call of libm's expf per element. (Not
    fastmath's `reassoc`: it would fold the rounding constant away.)"""
    underflow = z < f32(-87.0)
    z = min(max(z, f32(-87.0)), f32(88.0))
    k = (z * f32(1.4426950408889634) + f32(ROUNDING)) - f32(ROUNDING)  # round(z / ln 2)
    r = z - k * f32(LN2_HIGH)
    r = r - k * f32(LN2_LOW)
    p = ((((f32(1.9875691500e-4) * r + f32(1.3981999507e-3)) * r + f32(8.3334519073e-3)) * r
          + f32(4.1665795894e-2)) * r + f32(1.6666665459e-1)) * r + f32(5.0000001201e-1)
    e = (p * (r * r) + r + f32(1)) * as_f32((np.int32(k) + np.int32(127)) << np.int32(23))
    return f32(0) if underflow else e


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def geglu_rows(g, u, out):
    """out = gelu_tanh(g) * u element by element (layers.geglu): the reference's formula, 0.5 x (1 + tanh(s)),
    s = sqrt(2/pi) (x + 0.044715 x^3), with tanh(s) = sign(s) (1 - e) / (1 + e), e = e^(-2|s|) (exp_f32), in
    vector registers. That tanh is within about an ulp of 1 of the exact one, which is what 1 + tanh(s) needs
    (for s << 0 both it and the reference's round tanh(s) to float32's grid near -1 alike; written instead as
    x / (1 + e^(-2s)), more accurate there, it stood further from the reference and from transformers, up to
    6e-4 relative on an activation of -3). NumPy's float32 tanh took ~2.7 ns an element, and the reference's
    nine passes over a 500-token prefill's (500, 2048) a layer 4.0 ms (AMD EPYC Zen 3). error_model "numpy": a
    division by zero need not be checked for (1 + e >= 1), and the check kept the loop scalar. One thread.

    Shapes: g, u, out (N,) float32, contiguous (the (T, F) arrays flattened)
    """
    c = f32(math.sqrt(2 / math.pi))
    for i in range(g.shape[0]):
        x = g[i]
        s = c * (x + f32(0.044715) * x * x * x)
        e = exp_f32(f32(-2) * abs(s))
        tanh = math.copysign((f32(1) - e) / (f32(1) + e), s)
        out[i] = f32(0.5) * x * (f32(1) + tanh) * u[i]


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def exp_rows(x, shift):
    """x[r, j] = e^(x[r, j] - shift[r]) in place (exp_f32: -inf, a masked score, gives 0): the softmax's
    numerators in attention_tiles, one vector pass where NumPy made two (a subtraction, then its exp at ~1.4 ns an
    element: 1.0 of a 500-token prefill's 7.2 ms of attention a layer, AMD EPYC Zen 3). One thread.

    Shapes: x (R, N) float32, contiguous; shift (R,) float32"""
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[r, j] = exp_f32(x[r, j] - shift[r])


# ---- dequantizing tiles (prefill) -----------------------------------------------------------------------------

def widen_pair(q, at, scale, out, at0, at1):
    """out.flat[at0 + r] = scale[r] * q.flat[at + 2r] and out.flat[at1 + r] = scale[r] * q.flat[at + 2r + 1] for
    the 64 rows r: one pair of inputs of an Int8x64 block (64 rows x 2 bytes) widened into two rows of a tile.
    (NumPy; compiled, _widen_pair_ir: the same numbers. A Numba loop over the pairs' bytes read with a stride
    of 2 stayed scalar: 2.3x slower than the unpaired layout's tiles on the AMD EPYC Zen 3.)

    Shapes: q int8, out float32, contiguous, read and written flat; scale (64,) float32"""
    pair = q.reshape(-1)[at:at + 2 * ROWS].reshape(ROWS, 2).astype(f32)
    flat = out.reshape(-1)
    flat[at0:at0 + ROWS] = scale * pair[:, 0]
    flat[at1:at1 + ROWS] = scale * pair[:, 1]


@intrinsic
def _widen_pair_ir(typingctx, q, at, scale, out, at0, at1):
    """widen_pair as LLVM vector code: per 8 rows, 16 bytes sign-extended and converted, even and odd lanes split
    (shuffles), each times the 8 scales."""
    sig = types.void(q, types.int64, scale, out, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        q, at, scale, out, at0, at1 = args
        q_ty, _, scale_ty, out_ty, _, _ = signature.args
        pairs = _element_pointer(context, builder, q_ty, q, at, ir.VectorType(ir.IntType(8), 16))
        scales = _element_pointer(context, builder, scale_ty, scale, ir.Constant(ir.IntType(64), 0), _F8)
        rows = [_element_pointer(context, builder, out_ty, out, a, _F8) for a in (at0, at1)]
        lanes = [ir.Constant(_V8, list(range(k, 16, 2))) for k in (0, 1)]
        for c in range(ROWS // 8):
            i = ir.Constant(_I32, c)
            wide = builder.sitofp(builder.sext(builder.load(builder.gep(pairs, [i]), align=1), _V16), _F16)
            s8 = builder.load(builder.gep(scales, [i]), align=4)
            for k in (0, 1):
                value = builder.fmul(s8, builder.shuffle_vector(wide, wide, lanes[k]))
                builder.store(value, builder.gep(rows[k], [i]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@overload(widen_pair, inline="always")
def _widen_pair_compiled(q, at, scale, out, at0, at1):
    if all(isinstance(a, types.Array) and a.layout == "C" for a in (q, scale, out)) \
            and (q.dtype, scale.dtype, out.dtype) == (types.int8, types.float32, types.float32):
        return lambda q, at, scale, out, at0, at1: _widen_pair_ir(q, at, scale, out, at0, at1)
    return None


@njit(cache=True)
def int8x64_tile(q, d, b0, out):
    """Blocks b0.. of an Int8x64 matrix as float32, transposed: out[32g + j, 64(b - b0) + r] = d * q.

    Transposed (in, rows) because that is the packed order already (64 rows side by side) and it is the
    right operand BLAS wants for x @ tile.

    Shapes: q (B, G, 16, 64, 2) int8 (pairs of inputs: element 2p + k at [b, g, p, r, k]), d (B, G, 64) uint16,
            out (in, nb*64) float32 (nb blocks from b0)
    """
    G = q.shape[1]
    width = out.shape[1]
    for n in range(width // ROWS):
        b = b0 + n
        scale = np.empty(ROWS, f32)
        for g in range(G):
            fp16_to_f32(d[b, g], scale)
            for p in range(GROUP // 2):  # the pair's 128 bytes into two rows of the tile
                row = g * GROUP + 2 * p
                widen_pair(q, ((b * G + g) * (GROUP // 2) + p) * 2 * ROWS, scale, out, row * width + n * ROWS,
                           (row + 1) * width + n * ROWS)


@njit(cache=True)
def int4x64_tile(nibbles, d, m, b0, out):
    """Blocks b0.. of an Int4x64 matrix as float32, transposed: out[32g + j, 64(b - b0) + r] = d * q + m.

    Shapes: nibbles (B, G, 4, 64, 4) uint8 (byte 4i + k of a row's group at [b, g, i, r, k]), d, m (B, G, 64)
            uint16, out (in, nb*64) float32
    """
    G = nibbles.shape[1]
    half = GROUP // 2
    # (B, G, 4, 64): a row's 4 bytes as one word, byte k in bits 8k.. (little-endian, as x86 and ARM are)
    words = nibbles.reshape(nibbles.shape[:3] + (ROWS * 4,)).view(np.uint32)
    for n in range(out.shape[1] // ROWS):
        b = b0 + n
        scale = np.empty(ROWS, f32)
        low = np.empty(ROWS, f32)
        for g in range(G):
            fp16_to_f32(d[b, g], scale)
            fp16_to_f32(m[b, g], low)
            for i in range(half // 4):
                for k in range(4):  # byte k of each row's word: inputs 4i + k (low nibble) and 16 + 4i + k
                    j = 4 * i + k
                    for r in range(ROWS):  # across the rows: vector code
                        byte = (words[b, g, i, r] >> np.uint32(8 * k)) & np.uint32(255)
                        out[g * GROUP + j, n * ROWS + r] = scale[r] * f32(byte & np.uint32(15)) + low[r]
                        out[g * GROUP + j + half, n * ROWS + r] = scale[r] * f32(byte >> np.uint32(4)) + low[r]


# ---- attention ------------------------------------------------------------------------------------------------

Q_TILE = 16  # queries per job: their keys are read once from memory, then from cache for each query
K_TILE = 64  # keys per step of the online softmax


@njit(parallel=True, fastmath=FAST, cache=True)
def flash_attention(q, k, v, q_pos, k_pos, window, scale, cap, out):
    """out[h, t] = sum_s softmax_s(mask(cap(scale * q[h, t] . k[s, h // G]))) v[s, h // G]

    Every (head, tile of queries) is an independent job. For each tile of keys, the scores are computed,
    soft-capped and masked, then folded into a running softmax (FlashAttention, Dao et al. 2022): keep the
    running maximum m, the running sum l of exp(score - m), and the running weighted sum of values; when a
    new tile raises the maximum, rescale l and the sum by exp(m_old - m_new). No (T, S) matrix exists.
    Keys come in position order (KV cache), so the keys a query tile can see form one range: up to the last
    query's position, and (sliding window) after the first query's position - window. Order of operations as
    the reference (layers.attention): scale, soft-cap, mask, softmax.

    Shapes: q (H, T, Dh), k, v (S, K, Dh), q_pos (T,), k_pos (S,) ascending int64, window (0 = none),
            cap (0 = none), out (H, T, Dh) float32
    """
    H, T, Dh = q.shape
    K = k.shape[1]
    G = H // K
    tiles = (T + Q_TILE - 1) // Q_TILE
    for job in prange(H * tiles):
        h, t0 = job // tiles, (job % tiles) * Q_TILE
        t1 = min(T, t0 + Q_TILE)
        kv = h // G
        s_end = np.searchsorted(k_pos, q_pos[t1 - 1], side="right")  # keys at or before the last query
        s_start = 0
        if window > 0:
            s_start = np.searchsorted(k_pos, q_pos[t0] - window, side="right")  # inside the first query's window
        run_max = np.full(Q_TILE, -np.inf, dtype=f32)
        run_sum = np.zeros(Q_TILE, f32)
        acc = np.zeros((Q_TILE, Dh), f32)
        p = np.empty(K_TILE, f32)
        k_tile = np.empty((Dh, K_TILE), f32)  # this tile's keys, transposed
        many = t1 - t0 >= 4  # enough queries to pay for transposing the key tile
        for s0 in range(s_start, s_end, K_TILE):
            n = min(s_end, s0 + K_TILE) - s0
            if many:
                # transposed once per tile and reused by each query: the scores of a query are then sums
                # along the key axis (independent lanes), not dot products that each end in a horizontal sum
                for j in range(n):
                    for e in range(Dh):
                        k_tile[e, j] = k[s0 + j, kv, e]
            for i in range(t1 - t0):
                t = t0 + i
                if many:
                    p[:n] = 0
                    for e in range(Dh):
                        qe = q[h, t, e]
                        for j in range(n):
                            p[j] += qe * k_tile[e, j]
                else:  # decode: one query, each key read once straight from the cache
                    for j in range(n):
                        dot = f32(0)
                        for e in range(Dh):
                            dot += q[h, t, e] * k[s0 + j, kv, e]
                        p[j] = dot
                tile_max = f32(-np.inf)
                for j in range(n):
                    s = s0 + j
                    # layers.attention_mask's rule, restated for the compiled loop (tests hold the two equal)
                    if k_pos[s] > q_pos[t] or (window > 0 and k_pos[s] <= q_pos[t] - window):
                        p[j] = -np.inf  # masked: the future, or outside the window
                        continue
                    score = p[j] * f32(scale)
                    if cap > 0:  # layers.softcap, restated
                        score = f32(cap) * f32(math.tanh(score / f32(cap)))
                    p[j] = score
                    tile_max = max(tile_max, score)
                if tile_max == -np.inf:
                    continue  # nothing visible in this tile for this query
                new_max = max(run_max[i], tile_max)
                rescale = f32(math.exp(run_max[i] - new_max))  # exp(-inf) = 0 on the first visible tile
                run_sum[i] *= rescale
                for e in range(Dh):
                    acc[i, e] *= rescale
                for j in range(n):
                    if p[j] == -np.inf:
                        continue
                    w = f32(math.exp(p[j] - new_max))
                    run_sum[i] += w
                    for e in range(Dh):
                        acc[i, e] += w * v[s0 + j, kv, e]
                run_max[i] = new_max
        for i in range(t1 - t0):
            for e in range(Dh):
                out[h, t0 + i, e] = acc[i, e] / run_sum[i]


DECODE_MIN_KEYS = 64  # keys per job at least, when decode_attention splits a kv head's keys between threads
DECODE_AHEAD = 2  # keys ahead of the scores' pass that decode_attention prefetches (Zen 3: 1 and 2 alike, 4 slower)


@njit(parallel=True, fastmath=FAST, cache=True)
def decode_attention(q, k, v, first, last, scale, cap, part_max, part_sum, part_out):
    """One new query per head (a decode step) over the keys first..last-1 of the cache, all visible to it:
        part over a range c of keys: m_c = max_s z_s, l_c = sum_s exp(z_s - m_c), o_c = sum_s exp(z_s - m_c) v_s
        with z_s = cap(scale * q[h] . k[s]); merge_parts then gives
        out[h] = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c,  M = max_c m_c

    Flash-decoding (Dao et al. 2023): the keys are split into C ranges (part_max.shape[1]) so that every thread
    has a job even when there is a single kv head (Gemma 3 270M), and each job, one (kv head, range), scores
    every key for all G query heads that share it, so a key is read from memory once per step, not once per
    head. Within a job: tiles of K_TILE keys, the online softmax of flash_attention, four keys per pass (four
    independent sums per pass keep the multiply-adds busy; one dot product at a time waits on its own sum).

    In a decode step the cache comes from memory (the weights streamed since evict it), and reading it did not
    overlap the arithmetic: 58-72 us a layer at 505 keys against 31-37 from cache (AMD EPYC Zen 3). So the
    scores' pass asks for the keys and the values DECODE_AHEAD keys ahead (two streams at once, which this CPU
    reads faster than one after the other), and the softmax's exps are exp_f32 (vector code, not a libm call
    per score): 58.9 us from memory against 71.5 before (docs/kernels.md).

    Shapes: q (H, Dh), k, v (S, K, Dh), part_max, part_sum (K, C, G), part_out (K, C, G, Dh) float32
    """
    H, Dh = q.shape
    K, C = part_max.shape[0], part_max.shape[1]
    G = H // K
    per = -(-(last - first) // C)  # keys per range, the last range maybe shorter (or empty)
    for job in prange(K * C):
        kv, c = job // C, job % C
        c0, c1 = first + c * per, min(last, first + (c + 1) * per)
        run_max = np.full(G, -np.inf, dtype=f32)
        run_sum = np.zeros(G, f32)
        acc = np.zeros((G, Dh), f32)
        p = np.zeros((G, K_TILE), f32)
        for s0 in range(c0, c1, K_TILE):
            n = min(c1, s0 + K_TILE) - s0
            n4 = n - n % 4
            for j in range(0, n4, 4):  # scores: four keys at a time, each read once for the G heads
                for r in range(4):  # ask for the keys and values two keys ahead, a cache line at a time
                    for line in range(0, Dh, 16):
                        prefetch(k, ((s0 + j + r + DECODE_AHEAD) * K + kv) * Dh + line)
                        prefetch(v, ((s0 + j + r + DECODE_AHEAD) * K + kv) * Dh + line)
                for g in range(G):
                    h = kv * G + g
                    d0 = d1 = d2 = d3 = f32(0)
                    for e in range(Dh):
                        d0 += q[h, e] * k[s0 + j, kv, e]
                        d1 += q[h, e] * k[s0 + j + 1, kv, e]
                        d2 += q[h, e] * k[s0 + j + 2, kv, e]
                        d3 += q[h, e] * k[s0 + j + 3, kv, e]
                    p[g, j], p[g, j + 1], p[g, j + 2], p[g, j + 3] = d0, d1, d2, d3
            for j in range(n4, n):
                for g in range(G):
                    d0 = f32(0)
                    for e in range(Dh):
                        d0 += q[kv * G + g, e] * k[s0 + j, kv, e]
                    p[g, j] = d0
            for g in range(G):  # the online softmax, as flash_attention: scale, soft-cap, a new running maximum
                tile_max = run_max[g]
                for j in range(n):
                    score = p[g, j] * f32(scale)
                    if cap > 0:  # layers.softcap, restated
                        score = f32(cap) * f32(math.tanh(score / f32(cap)))
                    p[g, j] = score
                    tile_max = max(tile_max, score)
                rescale = f32(math.exp(run_max[g] - tile_max))  # exp(-inf) = 0 on the first tile
                run_sum[g] *= rescale
                for e in range(Dh):
                    acc[g, e] *= rescale
                run_max[g] = tile_max
                total = f32(0)
                for j in range(n):  # exp_f32, not math.exp: this loop becomes vector code
                    w = exp_f32(p[g, j] - tile_max)
                    p[g, j] = w
                    total += w
                run_sum[g] += total
            for j in range(0, n4, 4):  # weighted values: four keys at a time, each read once for the G heads
                for g in range(G):
                    w0, w1, w2, w3 = p[g, j], p[g, j + 1], p[g, j + 2], p[g, j + 3]
                    for e in range(Dh):
                        acc[g, e] += (w0 * v[s0 + j, kv, e] + w1 * v[s0 + j + 1, kv, e]
                                      + w2 * v[s0 + j + 2, kv, e] + w3 * v[s0 + j + 3, kv, e])
            for j in range(n4, n):
                for g in range(G):
                    for e in range(Dh):
                        acc[g, e] += p[g, j] * v[s0 + j, kv, e]
        for g in range(G):
            part_max[kv, c, g] = run_max[g]
            part_sum[kv, c, g] = run_sum[g]
            for e in range(Dh):
                part_out[kv, c, g, e] = acc[g, e]


@njit(fastmath=FAST, cache=True)
def merge_parts(part_max, part_sum, part_out, out):
    """out[kv * G + g] = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c, M = max_c m_c: decode_attention's ranges
    joined, each rescaled to the common maximum as the online softmax rescales a tile (an empty range has
    m = -inf, so its weight is 0; every query sees at least its own key, so M is finite).

    Shapes: part_max, part_sum (K, C, G), part_out (K, C, G, Dh) -> out (H, Dh) float32
    """
    K, C, G, Dh = part_out.shape
    for kv in range(K):
        for g in range(G):
            top = f32(-np.inf)
            for c in range(C):
                top = max(top, part_max[kv, c, g])
            total = f32(0)
            for e in range(Dh):
                out[kv * G + g, e] = 0
            for c in range(C):
                w = f32(math.exp(part_max[kv, c, g] - top))
                total += w * part_sum[kv, c, g]
                for e in range(Dh):
                    out[kv * G + g, e] += w * part_out[kv, c, g, e]
            for e in range(Dh):
                out[kv * G + g, e] /= total


# ---- the twins of the reference (layers.py) -------------------------------------------------------------------

def _bits(a: np.ndarray) -> np.ndarray:
    """fp16 arrays as their uint16 bit patterns (a view): what the kernels take."""
    return a.view(np.uint16)


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T, as layers.linear. Shapes: (T, in), (out, in) -> (T, out) float32"""
    x = np.ascontiguousarray(x, dtype=f32)
    T = x.shape[0]
    if type(w) in PACKED:  # int8 or int4: decode's case first, it is the one that runs ~70 times a token
        if T <= PACKED_MATVEC_MAX_T:
            return _packed_matvecs(x, (w,))[0]
        out = np.empty((T, _width(w)), f32)
        _tiled_matmul(x, w, out)
        return _logical(out, w.out_rows)
    if isinstance(w, LoRA):  # the frozen base through its kernel, plus the small low-rank branch (NumPy)
        return linear(x, w.base) + reference.lora_update(x, w)
    if isinstance(w, np.ndarray):
        if T <= MATVEC_MAX_T and w.dtype == f32 and w.flags.c_contiguous:
            out = np.empty((T, w.shape[0]), f32)
            _run(f32_matvec, x, w, out)
            return out
        return x @ w.T  # float32 prefill: BLAS sgemm
    if isinstance(w, Float16Bits) and T <= MATVEC_MAX_T:
        out = np.empty((T, w.shape[0]), f32)
        _run(f16bits_matvec, x, _bits(w.data), w.dtype == "bfloat16", out)
        return out
    return reference.linear(x, w)  # 16-bit prefill (a tile widened by NumPy, then BLAS), unpacked types


def linears(x: np.ndarray, *ws) -> list:
    """[x @ w.T for w in ws], as layers.linears: a decode step's products of one input with several int8 or int4
    matrices, q, k and v or gate and up, in one kernel call, one parallel loop over all their blocks (fewer
    loops, and the small k and v share one with q). Other cases: one `linear` each; None gives None.

    Shapes: (T, in), (out_i, in) each -> [(T, out_i)]"""
    x = np.ascontiguousarray(x, dtype=f32)
    given = [w for w in ws if w is not None]
    if x.shape[0] <= PACKED_MATVEC_MAX_T and len(given) > 1 and all(type(w) in PACKED for w in given):
        products = iter(_packed_matvecs(x, given))
        return [None if w is None else next(products) for w in ws]
    return [None if w is None else linear(x, w) for w in ws]


PACKED = (Int8x64, Int4x64)


def _packed_matvecs(x: np.ndarray, ws) -> list:
    """x @ w.T for Int8x64 and Int4x64 matrices through one matrix-vector kernel call: int8x64_matvec,
    int4x64_matvec, or mixed_matvec for a mix of the two. x is float32 and contiguous. Shapes: as linears"""
    return _matvec_call(ws)(x)


class _MatvecCall:
    """One matrix-vector kernel call for a tuple of packed matrices: which kernel, its weight arguments (each
    matrix's kernel_arrays, gathered into the kernel's tuples), the outputs' widths in the kernel's order (int8
    matrices first) and where each product goes back.

    Made once per tuple and kept with its first matrix (_matvec_call), because a decode step makes the same ~70
    calls every token: building the arguments each time was 6-12 us of Python per call on an AMD EPYC Zen 3, more
    inside a step than on its own (the weights streamed between two calls push the objects touched out of the
    caches), and for q, k and v of an int4 load (int4 and int8 mixed) more still (docs/kernels.md)."""

    def __init__(self, ws):
        order = sorted(range(len(ws)), key=lambda i: type(ws[i]) is Int4x64)  # the int8 matrices first
        self.split = sum(type(w) is Int8x64 for w in ws)  # how many: their outputs come before the int4 ones
        int8, int4 = ([ws[i].kernel_arrays for i in at] for at in (order[:self.split], order[self.split:]))
        self.kernel = mixed_matvec if int8 and int4 else int8x64_matvec if int8 else int4x64_matvec
        self.weights = (_each(int8, 2) if int8 else ()) + (_each(int4, 3) if int4 else ())
        self.widths = [_width(ws[i]) for i in order]
        self.back = [(order.index(i), w.out_rows) for i, w in enumerate(ws)]  # each product: position, rows
        self.others = [weakref.ref(w) for w in ws[1:]]  # to tell these matrices from later ones at the same ids

    def __call__(self, x: np.ndarray) -> list:
        outs = tuple([np.empty((x.shape[0], width), f32) for width in self.widths])
        if self.kernel is mixed_matvec:
            _run(mixed_matvec, x, *self.weights[:2], outs[:self.split], *self.weights[2:], outs[self.split:])
        else:
            _run(self.kernel, x, *self.weights, outs)
        return [_logical(outs[at], rows) for at, rows in self.back]


def _matvec_call(ws) -> _MatvecCall:
    """The _MatvecCall of this tuple of matrices, made on first use and kept in the first one's __dict__ (as
    kernel_arrays is), by the ids of the others."""
    calls = ws[0].__dict__.setdefault("matvec_calls", {})
    key = tuple([id(w) for w in ws[1:]])
    call = calls.get(key)
    if call is None or any(ref() is not w for ref, w in zip(call.others, ws[1:])):
        call = calls[key] = _MatvecCall(ws)
    return call


def _each(arrays: list, n: int) -> tuple:
    """The kernels' tuple arguments: ((q_1, q_2, ...), (d_1, d_2, ...)...) from [(q_1, d_1...), (q_2, d_2...)]."""
    return tuple([tuple([a[i] for a in arrays]) for i in range(n)])


def _width(w) -> int:
    """Rows of a packed matrix as stored: whole blocks of 64."""
    return (w.q if isinstance(w, Int8x64) else w.nibbles).shape[0] * ROWS


def _logical(out: np.ndarray, rows: int) -> np.ndarray:
    """A product with a packed matrix without its padding rows (none for Gemma's shapes): its first `rows`."""
    return out if out.shape[1] == rows else np.ascontiguousarray(out[:, :rows])


def _tiled_matmul(x: np.ndarray, w, out: np.ndarray) -> None:
    """out = x @ w.T for a packed matrix, a tile of dequantized rows at a time (_tiles).

    Shapes: x (T, in), out (T, B*64)"""
    for b0, n, tile in _tiles(w):
        np.matmul(x, tile, out=out[:, b0 * ROWS:(b0 + n) * ROWS])  # (T, in) @ (in, n*64), sgemm


def _tiles(w):
    """A packed matrix as float32, in equal tiles of about TILE_BYTES: yields (b0, n, tile), the blocks b0..b0+n
    transposed, tile (in, n*64) = W[64 b0 : 64 (b0 + n)].T, for a product with it before the next tile exists.

    The tiles are written into one scratch buffer per thread, reused from call to call: a fresh tile-sized
    array per product costs a page fault per 4 KB each time (docs/performance.md)."""
    in_features = w.shape[1]
    blocks = _width(w) // ROWS
    tiles = -(-blocks * in_features * ROWS * 4 // TILE_BYTES)  # ceil: how many tiles of <= TILE_BYTES
    step = -(-blocks // tiles)  # blocks per tile, the same for all but maybe the last
    scratch = _scratch(in_features * step * ROWS)
    for b0 in range(0, blocks, step):
        n = min(step, blocks - b0)
        tile = scratch[:in_features * n * ROWS].reshape(in_features, n * ROWS)
        _run(int8x64_tile if isinstance(w, Int8x64) else int4x64_tile, *w.kernel_arrays, b0, tile)
        yield b0, n, tile


def linear_backward(dout: np.ndarray, x: np.ndarray, w, dw=None) -> np.ndarray:
    """As layers.linear_backward: dx = dout W (and the weight's gradient when asked). A frozen Int8x64 or Int4x64
    weight, QLoRA's base, is widened by the prefill's tile kernels, a tile of rows at a time, instead of NumPy's
    `rows`: dx += dout[:, rows] @ tile.T. A LoRA weight: its base that way, plus the reference's low-rank
    branch. Everything else (float weights, float64 gradients in the tests) is the reference's own code.

    Shapes: dout (T, out), x (T, in), w (out, in) -> dx (T, in)"""
    if isinstance(w, LoRA):
        dx = linear_backward(dout, x, w.base)  # the base is frozen: only its dx
        return dx + reference.lora_update_backward(dout, x, w, *(dw if dw is not None else (None, None)))
    if not (isinstance(w, (Int8x64, Int4x64)) and dw is None and dout.dtype == f32):
        return reference.linear_backward(dout, x, w, dw)
    dx = np.zeros((dout.shape[0], w.shape[1]), f32)
    for b0, n, tile in _tiles(w):
        stop = min((b0 + n) * ROWS, w.out_rows)  # the last tile may hold padding rows past the matrix
        dx += dout[:, b0 * ROWS:stop] @ tile[:, :stop - b0 * ROWS].T  # (T, R) @ (R, in)
    return dx


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A float32 buffer of at least `size` elements, this thread's own, kept between calls."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.size < size:
        buf = _local.scratch = np.empty(size, f32)
    return buf[:size]


embedding_rows = reference.embedding_rows  # a gather: the packed layouts' `take` is already the fast path


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """As layers.rms_norm. Shapes: (..., N), (N,) -> (..., N) float32"""
    x = np.ascontiguousarray(x, dtype=f32)
    out = np.empty_like(x)
    N = x.shape[-1]
    weight = np.ascontiguousarray(weight, dtype=f32)
    if x.ndim == 2:  # decode's (1, D): no reshapes
        _run(rms_norm_rows, x, weight, float(eps), out)
    else:
        _run(rms_norm_rows, x.reshape(-1, N), weight, float(eps), out.reshape(-1, N))
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """As layers.apply_rope, for float32 (other dtypes: the reference). Shapes: (N, T, Dh), (T, Dh) x2 -> (N, T, Dh)
    (other shapes, which the reference broadcasts, such as training's (B, N, T, Dh): the reference)"""
    if not (x.dtype == cos.dtype == sin.dtype == f32 and x.ndim == 3 and cos.shape == sin.shape == x.shape[1:]):
        return reference.apply_rope(x, cos, sin)
    out = np.empty(x.shape, f32)
    _run(rope_rows, x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
    return out


def geglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """As layers.geglu, for float32 (other dtypes and shapes: the reference). Shapes: (T, F) x2 -> (T, F)"""
    if not (g.dtype == u.dtype == f32 and g.shape == u.shape):
        return reference.geglu(g, u)
    out = np.empty(g.shape, f32)
    _run(geglu_rows, np.ascontiguousarray(g).reshape(-1), np.ascontiguousarray(u).reshape(-1), out.reshape(-1))
    return out


BLAS_ATTENTION_MIN_T = 32  # from this many queries on, attention_tiles (sgemm per tile) beats flash_attention
BLAS_TILE = 128  # queries per tile of attention_tiles: 128 beat 256 by 10-20% at 500 and 2000 tokens (Gemma 3
# 270M shapes, AMD EPYC), when the key tiles were as wide
BLAS_KEY_TILE = 512  # keys per step of its running softmax: (K, G*128, 512) scores, 1 MB for G = 4 (about L2).
# Against 128: fewer, larger sgemm calls and fewer passes of the running softmax (rescaling the sums); 500-token
# attention of the 270M 9.2 ms a layer instead of 11.3 (AMD EPYC; 1024 gave 9.9)


def attention(q, k, v, q_positions, k_positions, window, scale, cap) -> np.ndarray:
    """As layers.causal_attention. Shapes: q (H, T, Dh), k, v (K, S, Dh), (T,), (S,) -> (H, T, Dh)"""
    if q.shape[1] >= BLAS_ATTENTION_MIN_T:
        return attention_tiles(q, k, v, q_positions, k_positions, window, scale, cap)
    if q.shape[1] == 1:
        return attention_decode(q, k, v, q_positions, k_positions, window, scale, cap)
    return attention_flash(q, k, v, q_positions, k_positions, window, scale, cap)


def attention_decode(q, k, v, q_positions, k_positions, window, scale, cap, ranges: int | None = None) -> np.ndarray:
    """decode_attention + merge_parts for one query per head. Its keys are one range of the cache (positions
    ascending): from the first inside the window to the query's own. They are split into `ranges` (default:
    enough for every thread to have a job, at least DECODE_MIN_KEYS keys each).

    Shapes: q (H, 1, Dh), k, v (K, S, Dh), (1,), (S,) -> (H, 1, Dh) float32"""
    H, _, Dh = q.shape
    K = k.shape[0]
    position = int(q_positions[0])
    k_positions = np.asarray(k_positions)  # its method, not np.searchsorted: that wrapper cost 3x as much
    last = int(k_positions.searchsorted(position, side="right"))  # keys at or before the query
    first = int(k_positions.searchsorted(position - window, side="right")) if window else 0
    if ranges is None:
        ranges = max(1, min(-(-numba.get_num_threads() // K), (last - first) // DECODE_MIN_KEYS))
    k_sk = np.ascontiguousarray(k.transpose(1, 0, 2), dtype=f32)  # (K, S, Dh) -> (S, K, Dh): a view of the cache
    v_sk = np.ascontiguousarray(v.transpose(1, 0, 2), dtype=f32)
    part_max, part_sum = np.empty((K, ranges, H // K), f32), np.empty((K, ranges, H // K), f32)
    part_out = np.empty((K, ranges, H // K, Dh), f32)
    _run(decode_attention, np.ascontiguousarray(q, dtype=f32).reshape(H, Dh), k_sk, v_sk, first, last,
         float(scale), float(cap or 0.0), part_max, part_sum, part_out)
    out = np.empty((H, 1, Dh), f32)
    _run(merge_parts, part_max, part_sum, part_out, out.reshape(H, Dh))
    return out


def attention_flash(q, k, v, q_positions, k_positions, window, scale, cap) -> np.ndarray:
    """flash_attention (decode, short prefills) with its arguments prepared. Shapes: as attention"""
    q = np.ascontiguousarray(q, dtype=f32)
    k_sk = np.ascontiguousarray(k.transpose(1, 0, 2), dtype=f32)  # (K, S, Dh) -> (S, K, Dh): a view if the
    v_sk = np.ascontiguousarray(v.transpose(1, 0, 2), dtype=f32)  # cache stores (S, K, Dh), as kvcache.py does
    out = np.empty(q.shape, f32)
    _run(flash_attention, q, k_sk, v_sk, np.ascontiguousarray(q_positions, dtype=np.int64),
                    np.ascontiguousarray(k_positions, dtype=np.int64), int(window or 0), float(scale),
                    float(cap or 0.0), out)
    return out


def attention_tiles(q, k, v, q_positions, k_positions, window, scale, cap, tile: int = BLAS_TILE,
                    key_tile: int = BLAS_KEY_TILE) -> np.ndarray:
    """Prefill attention: flash_attention's online softmax, one tile of queries x one tile of keys at a time,
    with each tile's two products done by BLAS sgemm (as layers.causal_attention; NumPy, and exp_rows for the exps).

    The same FlashAttention recurrence as flash_attention, on blocks instead of single queries: per tile of
    queries, walk the tiles of keys they can see, keeping for each query the running maximum m, the running
    sum l of exp(score - m), and the running weighted sum of values; a new maximum rescales both by
    exp(m_old - m_new). Scores exist for one (query tile, key tile) pair at a time, so memory stays
    O(tile * key_tile) per head however long the prompt; a sliding-window layer's query tile starts its walk
    at the first key its first query can see. The G query heads that share a kv head are stacked into one
    (G * tile, Dh) operand, so each product is one sgemm per kv head. Order as the reference: scale,
    soft-cap, mask, softmax. Only the keys that some query of the tile cannot see get the mask.

    Shapes: q (H, T, Dh), k, v (K, S, Dh), (T,), (S,) ascending -> (H, T, Dh) float32
    """
    q, k, v = (np.asarray(a, dtype=f32) for a in (q, k, v))
    H, T, Dh = q.shape
    K = k.shape[0]
    G = H // K
    q_pos, k_pos = np.asarray(q_positions), np.asarray(k_positions)
    out = np.empty((H, T, Dh), f32)
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        n_q = t1 - t0
        q_tile = q[:, t0:t1].reshape(K, G, n_q, Dh).reshape(K, G * n_q, Dh)  # heads h = kv * G + g, stacked
        s_end = int(np.searchsorted(k_pos, q_pos[t1 - 1], side="right"))  # keys at or before the last query
        s_start = int(np.searchsorted(k_pos, q_pos[t0] - window, side="right")) if window else 0
        run_max = np.full((K, G, n_q, 1), -np.inf, f32)
        run_sum = acc = None  # 0 before the first tile of keys, which sets them
        for s0 in range(s_start, s_end, key_tile):
            s1 = min(s_end, s0 + key_tile)
            scores = (q_tile @ k[:, s0:s1].transpose(0, 2, 1)).reshape(K, G, n_q, s1 - s0)  # sgemm per kv head
            scores *= f32(scale)  # in place, as the steps below: each pass over a (K, G*128, 512) block costs
            if cap:  # about as much as a tenth of its sgemm
                scores = reference.softcap(scores, cap)
            for c0, c1 in _masked_columns(q_pos[t0], q_pos[t1 - 1], k_pos[s0:s1], window):
                visible = reference.attention_mask(q_pos[t0:t1], k_pos[s0 + c0:s0 + c1], window or None)
                np.copyto(scores[..., c0:c1], f32(-np.inf), where=~visible)  # (n_q, c1 - c0), for every head
            new_max = np.maximum(run_max, scores.max(axis=-1, keepdims=True))  # > -inf: each query sees itself
            seen = np.isfinite(new_max)  # False only for queries with no visible key yet (none in this tile)
            safe_max = np.where(seen, new_max, f32(0))
            rows = scores.reshape(-1, s1 - s0)  # (a view: scores is a fresh contiguous product)
            _run(exp_rows, rows, safe_max.reshape(-1))  # e^(score - max) in place; masked: exp(-inf) = 0
            p = rows.reshape(scores.shape)
            values = (p.reshape(K, G * n_q, s1 - s0) @ v[:, s0:s1]).reshape(K, G, n_q, Dh)  # sgemm per kv head
            if acc is None:  # the first tile of keys: nothing to rescale yet
                run_sum, acc = p.sum(axis=-1, keepdims=True), values
            else:
                rescale = np.exp(run_max - safe_max)  # exp(-inf) = 0 for a query's first visible tile
                run_sum = run_sum * rescale + p.sum(axis=-1, keepdims=True)
                acc *= rescale
                acc += values
            run_max = new_max
        out[:, t0:t1] = (acc / run_sum).reshape(H, n_q, Dh)
    return out


def _masked_columns(first_query, last_query, k_pos, window) -> list:
    """The keys of a tile (positions ascending) that some query of a tile of queries cannot see, as column
    ranges [c0, c1): those after the first query (its future) and, with a sliding window, those at or before
    the last query's window start. The keys between are visible to every query and need no mask (all of them
    in the off-diagonal tiles of a causal prefill)."""
    n = len(k_pos)
    lo = int(np.searchsorted(k_pos, last_query - window, side="right")) if window else 0
    hi = int(np.searchsorted(k_pos, first_query, side="right"))
    if lo >= hi:
        return [(0, n)]  # nothing is visible to all: mask the whole tile
    return [(c0, c1) for c0, c1 in ((0, lo), (hi, n)) if c1 > c0]


def prepare(w):
    """The layout these kernels read fastest: int8 and int4 matrices repacked 64 rows side by side
    (packed.Int8x64 / Int4x64; same bytes). Other types are used as they are."""
    if isinstance(w, Int8):
        return Int8x64.pack(w)
    if isinstance(w, Int4):
        return Int4x64.pack(w)
    return w


# ---- compiling ------------------------------------------------------------------------------------------------

KERNELS = (int8x64_matvec, int4x64_matvec, mixed_matvec, f16bits_matvec, f32_matvec, int8x64_tile, int4x64_tile,
           flash_attention, decode_attention, merge_parts, rms_norm_rows, rope_rows, geglu_rows, exp_rows)
_ready: set = set()  # kernels called at least once in this process


def _run(kernel, *args) -> None:
    """Call a kernel; the first time in this process, say on stderr if it has to be compiled (seconds).

    Kernels compile on first use, for the types they are given, so a model compiles only what it uses
    (a float32 model never compiles the int4 kernels). With `cache=True` the machine code is stored in
    __pycache__ and later processes load it in milliseconds."""
    if kernel in _ready:
        kernel(*args)
        return
    _ready.add(kernel)
    announce = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0") and not _cached(kernel)
    if announce:
        print(f"minigemma: compiling the Numba kernel {kernel.__name__} (first run only; cached afterwards)...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    kernel(*args)
    if announce:
        print(f"minigemma: compiled {kernel.__name__} in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)


def _cached(kernel) -> bool:
    """Whether `kernel` has a cache index in __pycache__ newer than this file (a guess, for the message only:
    Numba's own check is finer, and NUMBA_CACHE_DIR may put the cache elsewhere)."""
    folder = Path(__file__).parent / "__pycache__"
    found = folder.glob(f"{Path(__file__).stem}.{kernel.__name__}-*.nbi") if folder.is_dir() else ()
    return any(os.path.getmtime(f) >= os.path.getmtime(__file__) for f in found)


def configure() -> None:
    """Called once, when this backend is first chosen (kernels.get): the process settings its kernels want."""
    if os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0"):
        choose_threads()
    keep_freed_memory()


def choose_threads() -> None:
    """One thread when the machine is already busy, unless NUMBA_NUM_THREADS says otherwise.

    Each parallel loop ends at a barrier where every thread waits for the slowest. When other processes hold
    the cores, a thread that lost its core holds everyone up for a scheduler time slice, at every one of the
    ~130 parallel loops of a decode step: a tenfold slowdown on a busy 2-core machine (docs/kernels.md,
    "Threads"; llama.cpp's own 2-thread loop suffers the same).
    "Busy" is a one-minute load average of at least one runnable process more than there are cores."""
    if "NUMBA_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    cores, load = numba.config.NUMBA_NUM_THREADS, os.getloadavg()[0]
    if cores > 1 and load >= cores + 1:
        numba.set_num_threads(1)
        blas = "" if "OPENBLAS_NUM_THREADS" in os.environ or not _openblas_one_thread() else " and OpenBLAS"
        print(f"minigemma: the machine is busy (load {load:.1f} on {cores} cores): the Numba kernels{blas} use "
              "1 thread (set NUMBA_NUM_THREADS to choose)", file=sys.stderr, flush=True)


def _openblas_one_thread() -> bool:
    """Ask NumPy's OpenBLAS (prefill's sgemm) for one thread too, as threadpoolctl would; False if not found."""
    if not os.path.exists("/proc/self/maps"):
        return False
    import ctypes

    paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                     "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                return True
    return False


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed arrays of up to 64 MB for reuse instead of giving them back to the OS.

    A forward pass makes temporaries of a few MB each (activations, products, the GELU's terms). By default
    glibc serves big requests with fresh mmap pages and trims its heap as soon as 8 MB or so are free at the
    top, so the next pass touches new pages again: a page fault per 4 KB (about a fifth of a 500-token prefill;
    docs/performance.md). This is what MALLOC_MMAP_THRESHOLD_=64M MALLOC_TRIM_THRESHOLD_=256M would do. It is
    process-wide: a long-running process may keep up to 256 MB of freed memory. Left alone if either variable
    is set, if GLIBC_TUNABLES tunes malloc, or with MINIGEMMA_KEEP_FREED_MEMORY=0. Linux with glibc only;
    elsewhere nothing happens."""
    if any(f"MALLOC_{k}_THRESHOLD_" in os.environ for k in ("MMAP", "TRIM")) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or os.environ.get("MINIGEMMA_KEEP_FREED_MEMORY", "1").strip() == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc
