"""What machine a benchmark ran on: printed and stored with every result, since speed claims hold per CPU.

    python benchmarks/machine.py        # prints the one-line description

The CPU model, its vector features that matter to the kernels (from /proc/cpuinfo), the L2 size, and the
target Numba's LLVM compiles for (its own name for the CPU, which decides the vector width it prefers: for
Intel server cores such as "rocketlake" or "sapphirerapids" LLVM prefers 256-bit vectors even with AVX-512;
for AMD "znver4" 512-bit). NUMBA_CPU_NAME overrides that target (docs/kernels.md).
"""

from __future__ import annotations

import os
import platform
import sys

# the flags of /proc/cpuinfo that change what the kernels compile to (docs/kernels.md)
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
            "amx_tile", "amx_int8")


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def cpu_features() -> list[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return []
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return [f for f in FEATURES if f in flags]


def l2_size() -> str:
    path = "/sys/devices/system/cpu/cpu0/cache/index2/size"
    return open(path).read().strip() if os.path.exists(path) else "?"


def llvm_target() -> str:
    """The CPU name Numba's LLVM compiles for: NUMBA_CPU_NAME if set, else LLVM's name for this host."""
    try:
        import llvmlite.binding as llvm
        from numba.core import config
    except ImportError:
        return "? (no numba)"
    return config.CPU_NAME or llvm.get_host_cpu_name()


def describe() -> dict:
    return dict(cpu=cpu_model(), cores=os.cpu_count(), l2_per_core=l2_size(), features=" ".join(cpu_features()),
                numba_llvm_target=llvm_target(), loadavg=loadavg())


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages (runnable processes, against os.cpu_count() cores)."""
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"


def line() -> str:
    d = describe()
    return (f"CPU: {d['cpu']}, {d['cores']} cores, L2 {d['l2_per_core']}/core; features: {d['features']}; "
            f"Numba LLVM target: {d['numba_llvm_target']}; load {d['loadavg']}; Python {sys.version.split()[0]}")


if __name__ == "__main__":
    print(line())
