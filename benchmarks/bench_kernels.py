"""Each decode kernel's memory bandwidth, against the machine's (~37 GB/s on the 2-core machine of the docs).

    python benchmarks/bench_kernels.py [--bandwidth 37] [--threads N]

Decoding one token reads every weight once, so a matrix-vector kernel is as fast as the bytes it reads
allow: GB/s = weight bytes / time. The column "of f32" compares each kernel's GB/s with the float32 kernel's
on the same matrix in the same run: a kernel that keeps up with memory streams as many bytes per second as
float32 does, whatever its bytes per weight (issue 19 asks >= 70% for the int8 LM head). The first line says
which CPU and which LLVM target (benchmarks/machine.py): the kernels compile differently per CPU. Shapes are
the built-in Gemma 3 270M's (the LM head is 262144 x 640; the layers' matrices are small enough to sit in the
L2/L3 caches between tokens, which is why they can beat DRAM bandwidth here) and gemma-2b's. Also: the
attention decode kernel over an 8k-position cache, and for comparison the NumPy reference of each. Medians of
repeated runs; random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from machine import line as machine_line
from minigemma import kernels, kernels_numba, layers
from minigemma.packed import Int4x64, Int8x64
from minigemma.weights import Float16Bits, Int4, Int8

SHAPES = {  # name: (out, in)
    "270M q_proj 1024x640": (1024, 640),
    "270M gate 2048x640": (2048, 640),
    "270M down 640x2048": (640, 2048),
    "270M LM head 262144x640": (262144, 640),
    "2b gate 16384x2048": (16384, 2048),
}


def weights(kind: str, x: np.ndarray):
    return {"float32": lambda: x, "bfloat16": lambda: Float16Bits.from_float(x, "bfloat16"),
            "int8": lambda: Int8x64.pack(Int8.from_float(x)), "int4": lambda: Int4x64.pack(Int4.from_float(x)),
            "int8 (Q8_0 layout)": lambda: Int8.from_float(x)}[kind]()


def seconds(fn, budget: float = 0.6) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=37.0, help="the machine's memory bandwidth, GB/s")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: Numba's)")
    parser.add_argument("--numpy", action="store_true", help="also time the NumPy reference (slow)")
    args = parser.parse_args()
    kernels.get("numba")  # sets up the backend as a model would (threads, malloc)
    import numba
    if args.threads:
        numba.set_num_threads(args.threads)
    print(machine_line())
    print(f"Numba threads: {numba.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; "
          f"bandwidth assumed {args.bandwidth} GB/s\n")
    print("| kernel | matrix | MB | time µs | GB/s | % of bandwidth | of f32 |"
          + (" NumPy GB/s |" if args.numpy else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.numpy else ""))
    rng = np.random.default_rng(0)
    for shape_name, (out, width) in SHAPES.items():
        dense = rng.standard_normal((out, width)).astype(np.float32)
        x = rng.standard_normal((1, width)).astype(np.float32)
        f32_rate = None
        for kind in ("float32", "bfloat16", "int8", "int4"):
            w = weights(kind, dense)
            t = seconds(lambda: kernels_numba.linear(x, w))
            rate = w.nbytes / t / 1e9
            f32_rate = f32_rate or rate
            row = (f"| {kind} matvec | {shape_name} | {w.nbytes / 1e6:.1f} | {t * 1e6:.0f} | "
                   f"{rate:.1f} | {100 * rate / args.bandwidth:.0f}% | {100 * rate / f32_rate:.0f}% |")
            if args.numpy:
                plain = weights({"int8": "int8 (Q8_0 layout)"}.get(kind, kind), dense) if kind != "int4" else \
                    Int4.from_float(dense)
                tn = seconds(lambda: layers.linear(x, plain), budget=0.3)
                row += f" {plain.nbytes / tn / 1e9:.2f} |"
            print(row, flush=True)
        del dense
    # attention decode: one query per head over an 8k-position cache (Gemma 3 270M: 4 heads, 1 kv head, 256)
    for S in (512, 8192):
        q = rng.standard_normal((4, 1, 256)).astype(np.float32)
        k = rng.standard_normal((1, S, 256)).astype(np.float32)
        v = rng.standard_normal((1, S, 256)).astype(np.float32)
        pos = np.arange(S)
        nbytes = k.nbytes + v.nbytes
        # decode_attention (the backend's choice for one query) and, for comparison in the same run,
        # flash_attention, which takes one job per query head and so reads the shared kv head once per head
        for name, kernel in (("attention decode", kernels_numba.attention_decode),
                             ("attention decode, per head (flash_attention)", kernels_numba.attention_flash)):
            t = seconds(lambda: kernel(q, k, v, pos[-1:], pos, None, 0.0625, None))
            print(f"| {name} | 4 heads over {S} positions (k+v) | {nbytes / 1e6:.1f} | {t * 1e6:.0f} | "
                  f"{nbytes / t / 1e9:.1f} | {100 * nbytes / t / 1e9 / args.bandwidth:.0f}% | – |")


if __name__ == "__main__":
    main()
