"""What LLVM made of each decode kernel on this CPU: the instructions of its inner loop, counted.

    python benchmarks/kernel_asm.py
    NUMBA_CPU_NAME=rocketlake python benchmarks/kernel_asm.py      # the code Numba would make on an Intel Xeon

Each matrix-vector kernel of kernels_numba.py is compiled afresh (not from the cache, whose code cannot be
inspected) for small arrays of the types a model gives it, and the basic block of its machine code with the
most vector multiplies (its inner loop) is printed as instruction counts, with the register width: x, y, z
for 128, 256, 512 bits. NUMBA_CPU_NAME makes LLVM compile for another CPU (llvm's names: znver4, rocketlake,
sapphirerapids, skylake-avx512, haswell, ...); the instruction-set features stay this machine's unless
NUMBA_CPU_FEATURES lists them, so the code can be read but may not run. docs/kernels.md has the tables.
"""

from __future__ import annotations

import collections
import re

import numba
import numpy as np

from machine import line as machine_line
from minigemma import kernels_numba as K

MULTIPLIES = re.compile(r"^\s+(?:vfmadd\w+|vmulps|vpmaddwd|vpdpwssd|vpdpbusd|vpmulld|vpmaddubsw)\s+[^\n]*%([xyz])mm",
                        re.M)
LANES = {"x": 1, "y": 2, "z": 4}  # 128-bit units of a register


def inner_loop(asm: str) -> collections.Counter:
    """Counts of the vector instructions in the basic block doing the most multiply work (multiplies times
    register width): the unrolled main loop, not its remainder."""
    blocks = re.split(r"\n(?=\.LBB)", asm)
    best = max(blocks, key=lambda b: sum(LANES[w] for w in MULTIPLIES.findall(b)))
    counts = collections.Counter()
    for name, operands in re.findall(r"^\s+(v\w+)\s+([^\n]*)", best, re.M):
        width = re.search(r"%([xyz])mm", operands)
        counts[f"{name} {width.group(1) if width else ''}".strip()] += 1
    return counts


def main():
    print(machine_line(), "\n")
    u16, T, B, G = np.uint16, 1, 2, 4
    x = np.zeros((T, G * 32), np.float32)
    cases = {  # kernel: arguments of the types a model passes
        "int8x64_matvec": (x, (np.zeros((B, G, 16, 64, 2), np.int8),), (np.zeros((B, G, 64), u16),),
                           (np.empty((T, B * 64), np.float32),)),  # one matrix: a tuple of one
        "int4x64_matvec": (x, (np.zeros((B, G, 16, 64), np.uint8),), (np.zeros((B, G, 64), u16),),
                           (np.zeros((B, G, 64), u16),), (np.empty((T, B * 64), np.float32),)),
        "f32_matvec": (x, np.zeros((B * 64, G * 32), np.float32), np.empty((T, B * 64), np.float32)),
        "f16bits_matvec": (x, np.zeros((B * 64, G * 32), u16), True, np.empty((T, B * 64), np.float32)),
    }
    print("| kernel | inner loop (count, instruction, register width) |")
    print("|---|---|")
    for name, args in cases.items():
        kernel = getattr(K, name)
        fresh = numba.njit(kernel.py_func, parallel=True, fastmath=K.FAST)  # uncached, so inspectable
        fresh(*args)
        counts = inner_loop(fresh.inspect_asm(fresh.signatures[0]))
        print(f"| {name} | " + ", ".join(f"{n} {i}" for i, n in counts.most_common()) + " |")


if __name__ == "__main__":
    main()
