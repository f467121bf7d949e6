#!/usr/bin/env python3
"""Flower's numpy aggregators on the inputs of `benches/aggregate.rs`.

Builds the same round as the Rust bench (n clients of a Llama-3.1-8B LoRA r=8
q_proj/v_proj adapter, d = 3,407,872, values from the same counter-based
SplitMix64 generator, tensors in sorted key order) and times Flower's
`aggregate`, `aggregate_median`, `aggregate_trimmed_avg`, `aggregate_krum`
(Krum and Multi-Krum) and `aggregate_bulyan`, reporting the median of
`--repeats` runs (Bulyan: one run, it is slow).

    flock /tmp/safe-fedllm-bench.lock python3 scripts/bench_aggregate_flower.py [--n 20] [--layers 32]
"""
import argparse
import statistics
import time

import numpy as np
import flwr
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from bench_round import adapter  # noqa: E402  (the shared round generator)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-bulyan", action="store_true")
    args = ap.parse_args()
    n = args.n
    f = (n - 3) // 4
    g = adapter(args.layers, 0)
    clients = [adapter(args.layers, c + 1, g) for c in range(n)]
    samples = [100 + i for i in range(n)]
    results = lambda: [(c, s) for c, s in zip(clients, samples)]
    d = sum(l.size for l in g)
    print(f"flwr {flwr.__version__}, numpy {np.__version__}, n={n}, d={d}, f={f}")
    rows = [
        ("fedavg", lambda: aggregate(results()), args.repeats),
        ("median", lambda: aggregate_median(results()), args.repeats),
        ("trimmed_mean", lambda: aggregate_trimmed_avg(results(), 0.1), args.repeats),
        ("krum", lambda: aggregate_krum(results(), num_malicious=f, to_keep=0), args.repeats),
        ("multi_krum", lambda: aggregate_krum(results(), num_malicious=f, to_keep=n - f), args.repeats),
    ]
    if not args.skip_bulyan:
        rows.append(
            ("bulyan", lambda: aggregate_bulyan(results(), num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0), 1)
        )
    for name, fn, repeats in rows:
        print(f"flower {name:<14} {timed(fn, repeats) * 1000:10.1f} ms")


if __name__ == "__main__":
    main()
