"""How cost grows with the model: load time, peak memory and decode speed on a gemma-2b-shaped checkpoint.

    python benchmarks/bench_gemma2b.py [--cache ~/.cache/minigemma] [--tokens 16]

The checkpoint is synthetic: the published gemma-2b config (minigemma/configs/gemma-2b.json) with random
bfloat16 weights, written once as safetensors shards to the cache folder (5 GB of disk; never part of the
repository) and reused. Random weights make the text meaningless but the cost real: every matrix has the
real shape. Each configuration runs in a fresh subprocess so peak RSS is its own. The int8 load must stay
within 1.3x its int8 weight bytes (quantized tensor by tensor as it is read, issue 7).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from machine import line as machine_line

WORKER = r"""
import json, os, resource, sys, time
folder, options, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
import minigemma
from minigemma.params import params_nbytes
model = minigemma.load(folder, progress=False, **options)
load_s = time.perf_counter() - t
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cache = model.new_cache()
t = time.perf_counter()
token = int(model.step(list(range(2, 34)), cache)[0].argmax())  # a 32-token prompt
prefill_s = time.perf_counter() - t
t = time.perf_counter()
for _ in range(tokens):
    token = int(model.step([token], cache)[0].argmax())
decode_s = time.perf_counter() - t
import numba
print(json.dumps(dict(load_s=load_s, weight_mb=params_nbytes(model.params) / 2**20, peak_load_mb=peak_load,
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      prefill_32_s=prefill_s, decode_tok_s=tokens / decode_s, threads=numba.get_num_threads())))
"""


def write_checkpoint(folder: Path) -> Path:
    """The synthetic checkpoint: config.json and bfloat16 safetensors shards of about 0.5 GB, written once."""
    from minigemma.config import PUBLISHED_CONFIGS, published_config
    from minigemma.params import LAYER_PREFIX, LAYER_TENSORS, MODEL_TENSORS
    from minigemma.weights import f32_to_bf16

    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = published_config("gemma-2b")
    rng = np.random.default_rng(0)

    def draw(shape):  # bfloat16 bits of N(0, 0.02), a block of rows at a time (no big float32 temporary)
        out = np.empty(shape, np.uint16)
        for start in range(0, shape[0], 4096):
            block = rng.standard_normal((min(4096, shape[0] - start),) + tuple(shape[1:]), np.float32)
            out[start:start + len(block)] = f32_to_bf16(block * np.float32(0.02))
        return out

    names = [spec.hf for spec in MODEL_TENSORS if spec.when(config)] + [
        LAYER_PREFIX["hf"].format(i) + spec.hf
        for i in range(config.num_hidden_layers) for spec in LAYER_TENSORS if spec.when(config, i)]
    shapes = {spec.hf: spec.shape(config) for spec in MODEL_TENSORS if spec.when(config)}
    shapes.update({LAYER_PREFIX["hf"].format(i) + spec.hf: spec.shape(config, i)
                   for i in range(config.num_hidden_layers) for spec in LAYER_TENSORS if spec.when(config, i)})
    weight_map, shard = {}, {}
    for name in names + [None]:
        if name is None or sum(a.nbytes for a in shard.values()) > 5e8:
            file = f"model-{len(set(weight_map.values())):05d}.safetensors"
            write_safetensors(folder / file, shard)
            weight_map.update({k: file for k in shard})
            shard = {}
        if name is not None:  # norms are zeros: their gain is 1 + w
            shard[name] = draw(shapes[name]) if len(shapes[name]) == 2 else np.zeros(shapes[name], np.uint16)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((PUBLISHED_CONFIGS / "gemma-2b.json").read_text())
    return folder


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """bfloat16 bits (uint16 arrays) as a safetensors file: 8-byte header length, JSON header, raw data.
    (safetensors.numpy cannot write bfloat16: NumPy has no such dtype.)"""
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in tensors.values():
            array.tofile(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "minigemma"))
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    t = time.perf_counter()
    folder = write_checkpoint(Path(args.cache) / "synthetic-gemma-2b")
    print(machine_line())  # speed holds per CPU: which one, its vector features, Numba's LLVM target
    print(f"checkpoint: {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 1e9:.2f} GB, "
          f"ready in {time.perf_counter() - t:.0f} s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    configs = {"numba int8": dict(quantize="int8", backend="numba"),
               "numba int4": dict(quantize="int4", backend="numba"),
               "numba bfloat16": dict(dtype="bfloat16", backend="numba")}
    print("| gemma-2b shape | load s | weights MB | peak RSS MB (load) | peak / weights | decode tok/s | "
          "GB/s (weights / decode time) |")
    print("|---|---|---|---|---|---|---|")
    for name, options in configs.items():
        done = subprocess.run([sys.executable, "-c", WORKER, str(folder), json.dumps(options), str(args.tokens)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['load_s']:.1f} | {r['weight_mb']:.0f} | {r['peak_load_mb']:.0f} | "
              f"{r['peak_load_mb'] / r['weight_mb']:.2f} | {r['decode_tok_s']:.2f} | "
              f"{r['weight_mb'] * 2**20 * r['decode_tok_s'] / 1e9:.1f} |  (threads: {r['threads']})", flush=True)


if __name__ == "__main__":
    main()
