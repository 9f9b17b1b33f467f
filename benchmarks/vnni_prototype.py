"""How much would VNNI's integer products give the int8 matrix-vector product? A prototype, outside the package.

    python benchmarks/vnni_prototype.py                      # the 270M's LM head (262144 x 640), 40 rounds
    python benchmarks/vnni_prototype.py --rows 2048 --cols 640
    python benchmarks/vnni_prototype.py --asm                # its inner loop's instructions only (no run)
    NUMBA_CPU_NAME=sapphirerapids NUMBA_CPU_FEATURES=+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2,+fma,+f16c \
        python benchmarks/vnni_prototype.py --asm                # the same, compiled on a CPU without VNNI

LLVM does not form AVX-512 VNNI's 4-way byte multiply-add (`vpdpbusd`) from any loop shape tried
(docs/kernels.md), so this prototype emits it itself: a Numba `@intrinsic` writes the LLVM IR call
`llvm.x86.avx512.vpdpbusd.512`. The activations are rounded to int8 per group of 32 (llama.cpp's Q8_0
activations), which changes the numbers (the package's kernels multiply float32 activations), so this stays a
measurement for deciding, not a kernel of the package.

Layout: W[b, g, s, r, k] = q[16b + r, 32g + 4s + k] + 128 as unsigned bytes, so one 64-byte load is 16 rows x
4 inputs and one vpdpbusd(acc, W, broadcast(4 activations)) adds 4 products to each row's 32-bit lane; the
+128 is taken back once per group as 128 * sum(activations). Scales: minigemma's Int8 (fp16 per row and group).

Prints this machine (machine.py), the prototype's error against the exact integer products (float64) and
against the float32 weights' product, then the median time and GB/s of three products of one vector,
alternating: the prototype (its activation rounding included), the package's int8 kernel (float32
activations, Int8x64), and the float32 product of the same matrix. It needs a CPU with avx512_vnni to run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, typeof, types
from numba.core import cgutils
from numba.extending import intrinsic

from machine import cpu_features, line as machine_line
from minigemma import kernels_numba as K
from minigemma.weights import Int8

I32, F32 = ir.IntType(32), ir.FloatType()
V16I32, V16F32, V16F16 = ir.VectorType(I32, 16), ir.VectorType(F32, 16), ir.VectorType(ir.HalfType(), 16)


@intrinsic
def group16(typingctx, w, w_at, xq, x_at, d, d_at, x_scale, x_sum128, out, out_at):
    """out[out_at:+16] += (sum_s vpdpbusd(W[w_at + 64s:+64], xq[x_at + 4s:+4]) - x_sum128) * d[d_at:+16] * x_scale

    One group of 32 inputs for 16 rows: 8 vpdpbusd on 512-byte runs of W, then one conversion to float."""
    sig = types.void(w, types.int64, xq, types.int64, d, types.int64, types.float32, types.int32, out, types.int64)

    def codegen(context, builder, signature, args):
        w, w_at, xq, x_at, d, d_at, x_scale, x_sum128, out, out_at = args
        w_ty, _, x_ty, _, d_ty, _, _, _, out_ty, _ = signature.args
        vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I32, [V16I32] * 3),
                                                  "llvm.x86.avx512.vpdpbusd.512")
        w_ptr = K._element_pointer(context, builder, w_ty, w, w_at, V16I32)
        x_ptr = K._element_pointer(context, builder, x_ty, xq, x_at, I32)  # 4 int8 activations per 32-bit word
        acc = K._broadcast(builder, builder.neg(x_sum128), V16I32)
        for s in range(8):
            weights = builder.load(builder.gep(w_ptr, [ir.Constant(I32, s)]), align=1)
            four = K._broadcast(builder, builder.load(builder.gep(x_ptr, [ir.Constant(I32, s)]), align=1), V16I32)
            acc = builder.call(vpdpbusd, [acc, weights, four])
        scales = builder.fpext(builder.load(K._element_pointer(context, builder, d_ty, d, d_at, V16F16), align=1),
                               V16F32)
        term = builder.fmul(builder.fmul(builder.sitofp(acc, V16F32), scales), K._broadcast(builder, x_scale, V16F32))
        out_ptr = K._element_pointer(context, builder, out_ty, out, out_at, V16F32)
        builder.store(builder.fadd(builder.load(out_ptr, align=1), term), out_ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, fastmath=True)
def vnni_matvec(xq, x_scale, x_sum128, w, d, out):
    """out[16b + r] = sum_g d[b, g, r] * x_scale[g] * sum_j q[16b + r, 32g + j] * xq[32g + j]

    Shapes: xq (in,) int8, x_scale (G,) float32, x_sum128 (G,) int32, w (B, G, 8, 16, 4) uint8,
    d (B, G, 16) uint16 (fp16 bits), out (B*16,) float32"""
    B, G = w.shape[0], w.shape[1]
    w_flat, d_flat = w.reshape(-1), d.reshape(-1)
    for b in prange(B):
        out[b * 16:(b + 1) * 16] = 0
        for g in range(G):
            group16(w_flat, (b * G + g) * 512, xq, g * 32, d_flat, (b * G + g) * 16, x_scale[g], x_sum128[g],
                    out, b * 16)


def pack(m: Int8):
    """Int8 (out, in) -> W (out/16, G, 8, 16, 4) uint8 (q + 128), d (out/16, G, 16) fp16 bits."""
    rows, groups, _ = m.q.shape
    w = (m.q.astype(np.int16) + 128).astype(np.uint8).reshape(rows // 16, 16, groups, 8, 4).transpose(0, 2, 3, 1, 4)
    d = m.d.reshape(rows // 16, 16, groups).transpose(0, 2, 1)
    return np.ascontiguousarray(w), np.ascontiguousarray(d).view(np.uint16)


def quantize_activations(x: np.ndarray):
    """Q8_0 of one vector, as llama.cpp rounds activations (Int8.from_float: int8 per group of 32, scale
    amax / 127 in fp16); and 128 * each group's sum. Shapes: (in,) -> (in,) int8, (G,) float32, (G,) int32"""
    q8 = Int8.from_float(x[None])
    xq = q8.q.reshape(-1)
    return xq, q8.d[0].astype(np.float32), 128 * q8.q[0].astype(np.int32).sum(axis=1, dtype=np.int32)


def inner_loop_counts() -> dict:
    """Compile for small arrays (without running: the code may be for another CPU) and count the vector
    instructions of the machine code (as kernel_asm.py)."""
    B, G = 2, 4
    args = (np.zeros(32 * G, np.int8), np.zeros(G, np.float32), np.zeros(G, np.int32),
            np.zeros((B, G, 8, 16, 4), np.uint8), np.zeros((B, G, 16), np.uint16), np.zeros(16 * B, np.float32))
    vnni_matvec.compile(tuple(typeof(a) for a in args))
    asm = next(iter(vnni_matvec.inspect_asm().values()))
    return dict(collections.Counter(f"{name} {width}" for name, width in re.findall(
        r"^\s+(vpdpbusd|vpbroadcastd|vcvtdq2ps|vcvtph2ps|vfmadd\w+|vmulps)\s+[^\n]*%([xyz])mm", asm, re.M)))


def target_has_vnni() -> bool:
    """Whether Numba compiles for a CPU with AVX-512 VNNI: this one, or the one NUMBA_CPU_FEATURES describes
    (without VNNI, LLVM cannot compile vpdpbusd and aborts the process)."""
    listed = os.environ.get("NUMBA_CPU_FEATURES")
    return "+avx512vnni" in listed.split(",") if listed else "avx512_vnni" in cpu_features()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=262144, help="output rows (a multiple of 64)")
    parser.add_argument("--cols", type=int, default=640, help="inputs (a multiple of 32)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--asm", action="store_true", help="print the compiled instructions and stop")
    args = parser.parse_args()
    print(machine_line())
    if args.rows % 64 or args.cols % 32 or args.rows <= 0 or args.cols <= 0:
        print(f"--rows {args.rows} --cols {args.cols}: expected positive multiples of 64 and 32", file=sys.stderr)
        return 2
    if args.asm and not target_has_vnni():
        print("vnni_prototype.py --asm: Numba compiles for this CPU, which has no avx512_vnni; name one that has it "
              "(NUMBA_CPU_NAME=sapphirerapids NUMBA_CPU_FEATURES=+avx512f,+avx512bw,+avx512vl,+avx512vnni,+avx2,"
              "+fma,+f16c; this file's docstring)", file=sys.stderr)
        return 1
    if args.asm:
        print("vector instructions (x/y/z: 128/256/512 bits):", inner_loop_counts())
        return 0
    if "avx512_vnni" not in cpu_features():
        print("vnni_prototype.py: this CPU has no avx512_vnni, so vpdpbusd cannot run here (--asm with another "
              "target still works: this file's docstring)", file=sys.stderr)
        return 1

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    w8 = Int8.from_float(w32)
    w, d = pack(w8)
    x = rng.standard_normal(args.cols).astype(np.float32)
    out = np.empty(args.rows, np.float32)
    xq, x_scale, x_sum128 = quantize_activations(x)
    vnni_matvec(xq, x_scale, x_sum128, w, d, out)
    exact = (w8.q.astype(np.float64) * xq.reshape(-1, 32)).sum(-1) * w8.d.astype(np.float64) * x_scale
    exact = exact.sum(-1)
    print(f"relative error against the exact integer products: {np.abs(out - exact).max() / np.abs(exact).max():.1e}"
          f" (float32 rounding); against float32 weights x float32 activations: "
          f"{np.abs(out - w32 @ x).max() / np.abs(w32 @ x).max():.1e} (Q8 rounding of the weights and activations)")

    packed = K.prepare(w8)
    candidates = {
        "vnni prototype (Q8 activations)": (lambda: vnni_matvec(*quantize_activations(x), w, d, out),
                                            w.nbytes + d.nbytes),
        "kernels_numba int8 (float32 activations)": (lambda: K.linear(x[None], packed), packed.nbytes),
        "kernels_numba float32": (lambda: K.linear(x[None], w32), w32.nbytes),
    }
    times = collections.defaultdict(list)
    for _ in range(3):  # warm: compiled, caches as in the timed rounds
        for run, _ in candidates.values():
            run()
    for _ in range(args.rounds):  # alternating, so that the machine's swings reach all three alike
        for name, (run, _) in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"{args.rows} x {args.cols}, medians of {args.rounds} alternating rounds:")
    for name, (_, nbytes) in candidates.items():
        median = float(np.median(times[name]))
        print(f"  {name:42s} {median * 1e3:8.3f} ms  {nbytes / median / 1e9:6.1f} GB/s  ({nbytes / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
