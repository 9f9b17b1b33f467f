"""Would the int8 kernel's 16-bit integer route make the int4 matrix-vector product faster? A prototype.

    python benchmarks/int4_integer_prototype.py                 # the 270M's LM head and three layer shapes
    python benchmarks/int4_integer_prototype.py --rows 2048 --cols 640 --rounds 30

(Since issue 19's eleventh session the package's int4 kernel is itself an integer one, with bytes: the
activations in three signed bytes and `vpmaddubsw`, docs/kernels.md "int4 in integers, with bytes"; this
prototype stays as the record of the 16-bit route, measured against whatever the package's kernel is.)

The package's int4 kernel (kernels_numba.int4x64_matvec) split each byte's two nibbles in float32: one
conversion, a multiply, a rounding and two multiply-adds per byte. The int8 kernel instead multiplies in 16-bit
integers against the activations split exactly into two halves (kernels_numba.split_activations, pair_sums:
`vpmaddwd` on x86). This prototype does the same for int4, with the package's functions for the split and the
IR helpers: per 8 rows and 2 bytes of each (4 weights), 16 bytes zero-extended to 16-bit lanes, the low nibbles
masked and the high ones shifted out, each multiplied with its pair of inputs as the int8 kernel does; the
group's minimum times the sum of its inputs, as the package's kernel. For one 16-byte load per 8 rows the bytes
are stored in pairs, as Int8x64 stores its inputs: element j and j + 16 of a row in byte j (ggml's order), bytes
2p and 2p + 1 of a row side by side. A layout change for the package (its tiles, rows and take too), so this
stays a measurement for deciding.

Measured on the AMD EPYC Zen 3 (znver3, AVX2; issue 19's eighth session, 2026-12-04): 0.94-1.07x the package's
kernel as it was before its sums went into registers (medians of 15 alternating rounds: the LM head 1.07x;
2,048 x 640, 640 x 2,048, 1,024 x 640 0.94-0.98x; 1.04-1.09x in a first version with the matrix in a tuple, as
the package's kernels take it). Per 256 weights
it takes 104 vector integer operations against the int8 route's 80, so int4 stays compute-bound there, and the
gain did not pay for a second layout. (Written first with the masks on 32-bit lanes, LLVM widened the nibbles
to 32 bits and packed them back to 16 for `vpmaddwd`: 0.8x. With AVX-512 VNNI, LLVM may fuse each `vpmaddwd`
and its `vpaddd` into `vpdpwssd`: the next run on such a CPU decides again.)

Prints this machine (machine.py), each product's error against the exact float64 product of the dequantized
weights, relative to a float32 summation bound (cols 2^-24 sum |x w|), then the median time and GB/s of the
package's kernel and the prototype, alternating.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from machine import line as machine_line
from minigemma import kernels_numba as K
from minigemma.packed import ROWS, Int4x64
from minigemma.weights import GROUP, Int4

f32 = np.float32
_I16x16 = ir.VectorType(ir.IntType(16), 16)


@intrinsic
def nibble_sums(typingctx, q, at, halves, x_at, m, d, mins, d_at, xsum, acc, c):
    """acc[c + r] += ((32768 H[r] + L[r]) 2^-29) d[r] m + mins[r] xsum for 8 rows r of one group (as pair_sums,
    with the nibbles of 8 bytes pairs at q[at + 128 p], p < 8, as the weights)."""
    sig = types.void(q, types.int64, halves, types.int64, types.float32, d, mins, types.int64, types.float32, acc,
                     types.int64)

    def codegen(context, builder, signature, args):
        q, at, halves, x_at, m, d, mins, d_at, xsum, acc, c = args
        q_ty, _, halves_ty, _, _, d_ty, mins_ty, _, _, acc_ty, _ = signature.args
        weights = K._element_pointer(context, builder, q_ty, q, at, ir.VectorType(ir.IntType(8), 16))
        pairs = K._element_pointer(context, builder, halves_ty, halves, x_at, K._I32)
        even, odd = (ir.Constant(K._V8, list(range(k, 16, 2))) for k in (0, 1))
        total = [ir.Constant(K._V8, [0] * 8)] * 2
        for p in range(GROUP // 4):  # 16 bytes: 8 rows x bytes 2p, 2p + 1 (low nibbles: inputs 2p, 2p + 1,
            byte = builder.zext(builder.load(builder.gep(weights, [ir.Constant(K._I32, p * 8)]), align=1), _I16x16)
            nibbles = (builder.and_(byte, ir.Constant(_I16x16, [15] * 16)),  # high nibbles: 2p + 16, 2p + 17)
                       builder.lshr(byte, ir.Constant(_I16x16, [4] * 16)))
            for half, nibble in enumerate(nibbles):
                w = builder.sext(nibble, K._V16)
                for which in (0, 1):  # h, then l
                    word = builder.load(builder.gep(pairs, [ir.Constant(K._I32, which * 16 + half * 8 + p)]))
                    x = builder.sext(builder.bitcast(K._broadcast(builder, word, K._V8), _I16x16), K._V16)
                    products = builder.mul(w, x)
                    neighbours = builder.add(builder.shuffle_vector(products, products, even),
                                             builder.shuffle_vector(products, products, odd))
                    total[which] = builder.add(total[which], neighbours)
        top, bottom = (builder.sitofp(t, K._F8) for t in total)
        term = builder.fmul(builder.fadd(builder.fmul(ir.Constant(K._F8, [32768.0] * 8), top), bottom),
                            ir.Constant(K._F8, [1 / K.SPLIT] * 8))

        scale, low = K._fp16_rows(context, builder, d_ty, d, d_at), K._fp16_rows(context, builder, mins_ty, mins, d_at)
        term = builder.fmul(builder.fmul(term, scale), K._broadcast(builder, m, K._F8))
        term = builder.fadd(term, builder.fmul(low, K._broadcast(builder, xsum, K._F8)))
        rows = K._element_pointer(context, builder, acc_ty, acc, c, K._F8)
        builder.store(builder.fadd(builder.load(rows, align=4), term), rows, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, fastmath=K.FAST)
def int4_paired_matvec(x, q, d, mins, out):
    """out[t, 64b + r] = the Int4 product, q (B, G, 8, 64, 2) uint8: byte [b, g, p, r, k] is byte 2p + k of row
    64b + r's group g. d, mins (B, G, 64) uint16 (fp16 bits)."""
    T, G = x.shape[0], q.shape[1]
    halves = np.empty((T, G, 2 * GROUP), np.int16)
    tops = np.empty((T, G), f32)
    K.split_activations(x, halves, tops)
    xsums = np.zeros((T, G), f32)
    for t in range(T):
        for g in range(G):
            for j in range(GROUP):
                xsums[t, g] += x[t, g * GROUP + j]
    for b in prange(q.shape[0]):
        acc = np.empty(ROWS, f32)
        for t in range(T):
            acc[:] = 0
            for g in range(G):
                for c in range(0, ROWS, 8):
                    nibble_sums(q, (b * G + g) * GROUP // 2 * ROWS + 2 * c, halves, (t * G + g) * 2 * GROUP, tops[t, g],
                                d, mins, (b * G + g) * ROWS + c, xsums[t, g], acc, c)
            out[t, b * ROWS:(b + 1) * ROWS] = acc


def paired(w: Int4x64) -> np.ndarray:
    """Int4x64's nibbles (B, G, 4, 64, 4) -> (B, G, 8, 64, 2): bytes 2p and 2p + 1 of a row side by side."""
    B, G = w.nibbles.shape[:2]
    by_byte = w.nibbles.transpose(0, 1, 2, 4, 3).reshape(B, G, GROUP // 2, ROWS)  # [b, g, j, r]: byte j of row r
    return np.ascontiguousarray(np.swapaxes(by_byte.reshape(B, G, GROUP // 4, 2, ROWS), -1, -2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, help="one matrix of this many rows (default: four shapes)")
    parser.add_argument("--cols", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per shape (default 15)")
    args = parser.parse_args()
    shapes = [(args.rows, args.cols)] if args.rows else [(262144, 640), (2048, 640), (640, 2048), (1024, 640)]
    print(machine_line())
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        groups = cols // GROUP
        w = Int4(rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8),
                 (rng.random((rows, groups), f32) * 0.01).astype(np.float16),
                 (-rng.random((rows, groups), f32) * 0.08).astype(np.float16))
        packed = Int4x64.pack(w)
        q, d, mins = paired(packed), packed.d.view(np.uint16), packed.m.view(np.uint16)
        x = rng.standard_normal((1, cols), dtype=f32)
        ours, theirs = (np.empty((1, q.shape[0] * ROWS), f32) for _ in range(2))
        runs = {"package int4x64_matvec": lambda: K.int4x64_matvec(x, (packed.nibbles,), (d,), (mins,), (theirs,)),
                "prototype (16-bit integers)": lambda: int4_paired_matvec(x, q, d, mins, ours)}
        for run in runs.values():
            run()  # compiles
        step = max(1, rows // 4096)  # the error on every step-th row (the LM head's float64 product is large)
        dense = w.rows(0, rows)[::step].astype(np.float64)
        exact = x.astype(np.float64) @ dense.T
        bound = np.abs(x).astype(np.float64) @ np.abs(dense).T * cols * 2.0 ** -24
        for name, out in (("package", theirs), ("prototype", ours)):
            error = np.max(np.abs(out[:, :rows:step] - exact) / bound)
            print(f"{rows} x {cols}: {name} error / float32 bound, max {error:.2g}")
        reps = max(1, int(2e7 // (rows * cols)))
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                for _ in range(reps):
                    run()
                times[name].append((time.perf_counter() - start) / reps)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        for name, seconds in medians.items():
            print(f"  {name:28} {seconds * 1e6:9.0f} us  {packed.nbytes / seconds / 1e9:5.1f} GB/s")
        ratio = medians["package int4x64_matvec"] / medians["prototype (16-bit integers)"]
        print(f"  prototype / package speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
