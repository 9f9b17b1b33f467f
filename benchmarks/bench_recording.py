"""What recording costs (minigemma/recording.py), on the built-in Gemma 3 270M.

Off, each `record(...)` call in the model is a function call that finds no active recording and returns.
This measures that no-op, counts how many such calls one forward pass makes, and sets their total against
the cheapest forward pass there is: one token (a decode step's work). Then, for scale, the same pass and a
prefill with recording on (which copies every recorded value).

    python benchmarks/bench_recording.py [--prompt-tokens 64] [--repeats 20]

Absolute times drift on shared machines; the ratio of the no-op total to a one-token pass is the point.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import numpy as np

import minigemma
from minigemma import recording
from minigemma.recording import record, record_forward


class _Counter(recording.Recording):
    """A recording that only counts the record calls that reach it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _add(self, layer, values):
        self.count += 1


def calls_per_forward(model, ids) -> int:
    counter = _Counter()
    recording._recording = counter
    try:
        model.forward(ids)
    finally:
        recording._recording = None
    return counter.count


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    model = minigemma.load(progress=False, backend="numba")
    ids = [2] + list(np.random.default_rng(0).integers(1000, 20000, args.prompt_tokens - 1))
    n_calls = calls_per_forward(model, ids)

    # the no-op: the biggest call in the model (nine keyword arguments), with recording off
    x = np.zeros((4, 1, 256), np.float32)
    n = 200_000
    noop_s = timeit.timeit(lambda: record(3, q=x, k=x, v=x, q_positions=x, k_positions=x, window=None, scale=1.0,
                                          softcap=None), number=n) / n

    def one_token():  # the cheapest forward pass: the work of one decode step, on an empty cache
        model.forward(ids[:1])

    def recorded(fn):
        def run():
            with record_forward():
                fn()
        return run

    one_token_s = median_time(one_token, args.repeats)
    one_token_on_s = median_time(recorded(one_token), args.repeats)
    prefill_s = median_time(lambda: model.forward(ids), max(3, args.repeats // 5))
    prefill_on_s = median_time(recorded(lambda: model.forward(ids)), max(3, args.repeats // 5))

    print(f"record() calls per forward pass:        {n_calls}")
    print(f"one record() call, recording off:        {noop_s * 1e9:.0f} ns")
    print(f"all of them, per forward pass:           {n_calls * noop_s * 1e6:.1f} us")
    print(f"a one-token forward pass, off:           {one_token_s * 1e3:.1f} ms")
    print(f"  -> the no-op calls are {100 * n_calls * noop_s / one_token_s:.3f}% of it")
    print(f"a one-token forward pass, recording on:  {one_token_on_s * 1e3:.1f} ms")
    print(f"prefill of {len(ids)} tokens, off / on:        {prefill_s * 1e3:.0f} ms / {prefill_on_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
