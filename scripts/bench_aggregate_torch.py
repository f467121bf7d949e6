#!/usr/bin/env python3
"""torch (CPU) aggregators at their best on the inputs of `benches/aggregate.rs`.

The peer a Python user reaches for beside Flower's numpy code: torch on CPU, as
the Safe-FedLLM reference implementation uses. Builds the same round as the Rust
bench and `bench_aggregate_flower.py` (n clients of a Llama-3.1-8B LoRA r=8
q_proj/v_proj adapter, d = 3,407,872, values from the same counter-based
SplitMix64 generator, tensors in sorted key order), stacks the clients' values
into one [n, d] float32 tensor X (torch's best case: the stacking is NOT timed).

Every rule is timed in two or three formulations a careful user could write, and
the fastest is reported beside the naive one (the first, as the Safe-FedLLM
reference and most tutorials write it), so our figures are compared with torch
at its best, not with a handicapped script:

* FedAvg: the n weights are normalised first (n values), then one GEMV
  `w @ X`, `torch.einsum("n,nd->d", w, X)` or `(w[:, None] * X).sum(0)`;
  naive: `(w @ X) / w.sum()` (a second pass over the d outputs).
* Krum / Multi-Krum: pairwise distances do not depend on the global g, so they
  come from the Gram matrix of X (`X @ X.T`) or `torch.cdist`; Multi-Krum
  averages the kept rows as one GEMV with weights 1/m on them. Naive: the
  Gram of `X - g` (an [n, d] temporary) and `X[idx].mean(0)`.
* median: `X.median(0)` or `X.sort(0)`; trimmed mean: sort, or total minus
  the k largest and k smallest (`topk`); norm clipping: with the `X - g`
  temporary, or from ‖x‖², X·g and one GEMV; geometric median (Weiszfeld, 8
  steps): with `X - z` per step, or from the Gram matrix (O(n²) per step).

The read-once floor is timed in the same run (`X.sum()`, and a copy
`X.clone()`), and each rule is quoted as a multiple of it, so machines can be
compared. Reports the median of `--repeats` calls per formulation and the peak
RSS of the process.

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


# ---- FedAvg -----------------------------------------------------------------

def fedavg_naive(x, w):
    return (w @ x) / w.sum()


def fedavg_gemv(x, wn):
    return wn @ x


def fedavg_einsum(x, wn):
    return torch.einsum("n,nd->d", wn, x)


def fedavg_broadcast(x, wn):
    return (wn[:, None] * x).sum(dim=0)


# ---- Krum / Multi-Krum ------------------------------------------------------

def scores_from_dist(dist, f):
    n = dist.shape[0]
    nearest, _ = torch.topk(dist, n - f - 1, dim=1, largest=False)  # includes self (0)
    return nearest.sum(dim=1)


def sq_dist_gram(x):
    gram = x @ x.T
    sq = torch.diagonal(gram)
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)


def sq_dist_cdist(x):
    return torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist").square()


def krum(x, f, dist_fn):
    return x[torch.argmin(scores_from_dist(dist_fn(x), f))]


def krum_naive(x, g, f):
    return krum(x - g, f, sq_dist_gram) + g


def multi_krum(x, f, m, dist_fn):
    idx = torch.topk(scores_from_dist(dist_fn(x), f), m, largest=False).indices
    w = torch.zeros(x.shape[0], dtype=x.dtype)
    w[idx] = 1.0 / m
    return w @ x


def multi_krum_naive(x, g, f, m):
    d = x - g
    idx = torch.topk(scores_from_dist(sq_dist_gram(d), f), m, largest=False).indices
    return g + d[idx].mean(dim=0)


# ---- coordinate-wise --------------------------------------------------------

def median_sort(x):
    n = x.shape[0]
    s, _ = torch.sort(x, dim=0)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def trimmed_mean_sort(x, k):
    s, _ = torch.sort(x, dim=0)
    return s[k : x.shape[0] - k].mean(dim=0)


def trimmed_mean_topk(x, k):
    hi = torch.topk(x, k, dim=0).values.sum(dim=0)
    lo = torch.topk(x, k, dim=0, largest=False).values.sum(dim=0)
    return (x.sum(dim=0) - hi - lo) / (x.shape[0] - 2 * k)


# ---- norm clipping ----------------------------------------------------------

def clip_coefs(norms):
    bound = norms.median()
    return torch.clamp(bound / norms, max=1.0) / norms.shape[0]


def norm_clipping_naive(x, g):
    delta = x - g
    return g + (delta * clip_coefs(delta.norm(dim=1))[:, None]).sum(dim=0)


def norm_clipping_fused(x, g):
    # ‖x − g‖² = ‖x‖² − 2 x·g + ‖g‖², then g + Σ cᵢ(xᵢ − g) = (1 − Σc) g + c @ X.
    sq = torch.einsum("nd,nd->n", x, x) - 2.0 * (x @ g) + g @ g
    c = clip_coefs(sq.clamp_min(0.0).sqrt())
    return (1.0 - c.sum()) * g + c @ x


# ---- geometric median -------------------------------------------------------

def geometric_median_naive(x, iters=8, nu=1e-6):
    z = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / torch.clamp((x - z).norm(dim=1), min=nu)
        z = (w @ x) / w.sum()
    return z


def geometric_median_gram(x, iters=8, nu=1e-6):
    # z = c @ X, so ‖xᵢ − z‖² = Gᵢᵢ − 2 (G c)ᵢ + cᵀ G c: one Gram, O(n²) per step.
    gram = (x @ x.T).double()
    n = x.shape[0]
    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diag = torch.diagonal(gram)
    for _ in range(iters):
        gc = gram @ c
        dist = (diag - 2.0 * gc + c @ gc).clamp_min(0.0).sqrt()
        w = 1.0 / torch.clamp(dist, min=nu)
        c = w / w.sum()
    return c.float() @ x


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
    m = n - f
    k = max(1, int(0.1 * n))
    g_np = flat(args.layers, 0)
    x = torch.from_numpy(np.stack([flat(args.layers, c + 1, g_np) for c in range(n)]))
    g = torch.from_numpy(g_np)
    w = torch.tensor([100.0 + i for i in range(n)], dtype=torch.float32)
    wn = w / w.sum()  # n values: normalising here costs nothing next to the d-long pass
    d = x.shape[1]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n={n}, d={d}, f={f}")
    floor = {"x.sum()": lambda: x.sum(), "x.clone()": lambda: x.clone()}
    # rule -> (naive formulation, {name: formulation}); the naive one competes too.
    rules = {
        "fedavg": ("(w @ X) / w.sum()", {
            "(w @ X) / w.sum()": lambda: fedavg_naive(x, w),
            "w @ X": lambda: fedavg_gemv(x, wn),
            "einsum": lambda: fedavg_einsum(x, wn),
            "(w[:,None]*X).sum(0)": lambda: fedavg_broadcast(x, wn),
        }),
        "median": ("X.median(0)", {
            "X.median(0)": lambda: x.median(dim=0),
            "X.sort(0)": lambda: median_sort(x),
        }),
        "trimmed_mean": ("sort", {
            "sort": lambda: trimmed_mean_sort(x, k),
            "sum - topk": lambda: trimmed_mean_topk(x, k),
        }),
        "krum": ("Gram of X - g", {
            "Gram of X - g": lambda: krum_naive(x, g, f),
            "Gram of X": lambda: krum(x, f, sq_dist_gram),
            "cdist": lambda: krum(x, f, sq_dist_cdist),
        }),
        "multi_krum": ("Gram of X - g, X[idx].mean", {
            "Gram of X - g, X[idx].mean": lambda: multi_krum_naive(x, g, f, m),
            "Gram of X, w @ X": lambda: multi_krum(x, f, m, sq_dist_gram),
            "cdist, w @ X": lambda: multi_krum(x, f, m, sq_dist_cdist),
        }),
        "norm_clipping": ("X - g", {
            "X - g": lambda: norm_clipping_naive(x, g),
            "‖x‖², X·g, c @ X": lambda: norm_clipping_fused(x, g),
        }),
        "geometric_median": ("X - z per step", {
            "X - z per step": lambda: geometric_median_naive(x),
            "Gram, c @ X": lambda: geometric_median_gram(x),
        }),
    }
    floors = {name: timed(fn, args.repeats) for name, fn in floor.items()}
    read_once = floors["x.sum()"]
    for name, t in floors.items():
        print(f"torch {'read_once':<16} {t * 1000:10.1f} ms  {t / read_once:5.2f}× floor  ({name})")
    for rule, (naive, forms) in rules.items():
        times = {name: timed(fn, args.repeats) for name, fn in forms.items()}
        best = min(times, key=times.get)
        t = times[best]
        print(
            f"torch {rule:<16} {t * 1000:10.1f} ms  {t / read_once:5.2f}× floor  ({best}; naive "
            f"{naive}: {times[naive] * 1000:.1f} ms; "
            + ", ".join(f"{k} {v * 1000:.1f}" for k, v in times.items() if k not in (best, naive))
            + ")"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch peak_rss_mb {peak_mb:.0f}")


if __name__ == "__main__":
    main()
