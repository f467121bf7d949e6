#!/usr/bin/env python3
"""The peers of `examples/streamed_round.rs`: the same n BF16 uploads, held in
memory the way a torch or Flower server holds a round, then averaged.

* torch: each file loaded with `safetensors.torch.load_file`, flattened to f32
  in sorted key order and stacked into one [n, d] tensor; FedAvg = `w @ X`.
* Flower: the same f32 arrays as numpy lists per client (what `ArrayRecord`
  hands a strategy), averaged with `flwr.server.strategy.aggregate.aggregate`.

Each prints load time, aggregation time (median of `--repeats`) and the peak RSS
of its process (ru_maxrss). Run after the example has written the files:

    cargo run --release --example streamed_round -- --n 100
    flock /tmp/safe-fedllm-bench.lock python3 scripts/bench_streamed_round_peers.py --n 100
"""
import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "..", "target", "streamed-round")


def peer(kind, paths, repeats, threads):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows = []
    for p in paths:
        tensors = load_file(p)
        rows.append([tensors[k].to(torch.float32) for k in sorted(tensors)])
    if kind == "torch":
        x = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in rows])
        del rows
        w = torch.tensor([160.0] * len(paths))
        fn = lambda: (w @ x) / w.sum()
    else:
        from flwr.server.strategy.aggregate import aggregate

        results = [([t.numpy() for t in r], 160) for r in rows]
        fn = lambda: aggregate(results)
    load_s = time.perf_counter() - t0
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peer": kind, "n": len(paths), "load_s": round(load_s, 3),
                      "fedavg_s": round(statistics.median(times), 4), "peak_rss_mb": round(peak_mb, 1)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--dir", default=DEFAULT_DIR)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", choices=["torch", "flower"])
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.dir, "client-*.safetensors")))[: args.n]
    if len(paths) < args.n:
        sys.exit(f"only {len(paths)} uploads in {args.dir}: run the example with --n {args.n} first")
    if args.peer:
        peer(args.peer, paths, args.repeats, args.threads)
        return
    # One process per peer, so each peak RSS is its own.
    for kind in ("torch", "flower"):
        subprocess.run([sys.executable, __file__, "--n", str(args.n), "--dir", args.dir,
                        "--repeats", str(args.repeats), "--threads", str(args.threads),
                        "--peer", kind], check=True)


if __name__ == "__main__":
    main()
