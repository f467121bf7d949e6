#!/usr/bin/env python3
"""torch (CPU) aggregators on the inputs of `benches/aggregate.rs`.

The peer a Python user reaches for beside Flower's numpy code: torch on CPU, as
the Safe-FedLLM reference implementation uses. Builds the same round as the Rust
bench and `bench_aggregate_flower.py` (n clients of a Llama-3.1-8B LoRA r=8
q_proj/v_proj adapter, d = 3,407,872, values from the same counter-based
SplitMix64 generator, tensors in sorted key order), stacks the updates into one
[n, d] float32 tensor (torch's best case: the stacking is NOT timed) and times:

* FedAvg as one GEMV over the stacked updates (`w @ X`);
* coordinate median (`X.median(dim=0)`) and a sort-based trimmed mean;
* Krum and Multi-Krum through the Gram matrix (`X @ X.T`, then scores),
  Multi-Krum averaging the selected rows;
* norm clipping (median norm) and one-shot geometric median (Weiszfeld, 8 steps).

Reports the median of `--repeats` calls per rule and the peak RSS of the process.

    flock /tmp/safe-fedllm-bench.lock python3 scripts/bench_aggregate_torch.py [--n 20] [--threads 2]
"""
import argparse
import resource
import statistics
import time

import numpy as np
import torch

from bench_round import adapter  # the shared round generator (same values as the Rust bench)


def flat(layers, stream, global_flat=None):
    v = np.concatenate([a.reshape(-1) for a in adapter(layers, stream)])
    return v if global_flat is None else v + global_flat


def timed(fn, repeats):
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fedavg(x, w):
    return (w @ x) / w.sum()


def trimmed_mean(x, k):
    s, _ = torch.sort(x, dim=0)
    return s[k : x.shape[0] - k].mean(dim=0)


def krum_scores(x, f):
    gram = x @ x.T
    sq = torch.diagonal(gram)
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    n = x.shape[0]
    nearest, _ = torch.topk(dist, n - f - 1, dim=1, largest=False)  # includes self (0)
    return nearest.sum(dim=1)


def krum(x, f):
    return x[torch.argmin(krum_scores(x, f))]


def multi_krum(x, f, m):
    idx = torch.topk(krum_scores(x, f), m, largest=False).indices
    return x[idx].mean(dim=0)


def norm_clipping(x, g):
    delta = x - g
    norms = delta.norm(dim=1)
    bound = norms.median()
    scale = torch.clamp(bound / norms, max=1.0)
    return g + (delta * scale[:, None]).mean(dim=0)


def geometric_median(x, iters=8, nu=1e-6):
    z = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / torch.clamp((x - z).norm(dim=1), min=nu)
        z = (w @ x) / w.sum()
    return z


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    f = (n - 3) // 4
    g_np = flat(args.layers, 0)
    x = torch.from_numpy(np.stack([flat(args.layers, c + 1, g_np) for c in range(n)]))
    g = torch.from_numpy(g_np)
    w = torch.tensor([100.0 + i for i in range(n)], dtype=torch.float32)
    d = x.shape[1]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n={n}, d={d}, f={f}")
    rows = [
        ("read_once", lambda: x.sum()),
        ("fedavg", lambda: fedavg(x, w)),
        ("median", lambda: x.median(dim=0)),
        ("trimmed_mean", lambda: trimmed_mean(x, max(1, int(0.1 * n)))),
        ("krum", lambda: krum(x - g, f)),
        ("multi_krum", lambda: multi_krum(x - g, f, n - f)),
        ("norm_clipping", lambda: norm_clipping(x, g)),
        ("geometric_median", lambda: geometric_median(x)),
    ]
    for name, fn, in rows:
        print(f"torch {name:<16} {timed(fn, args.repeats) * 1000:10.1f} ms")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch peak_rss_mb {peak_mb:.0f}")


if __name__ == "__main__":
    main()
