#!/usr/bin/env python3
"""Peer timing for `cargo bench --bench detect` (detect_step_scoring/10_steps).

The Safe-FedLLM reference scores step-level evidence by writing every local
step's (first-layer lora_B) delta to a file during training and reading all
files back to score them with the linear probe. This script times that
pipeline with numpy on the same shapes as the Rust bench (Llama-3.1-8B LoRA
r = 8 on q_proj/v_proj, 10 steps): per step, select the first layer's lora_B
tensors, subtract the base, `np.save` to a temp dir (the reference uses
`torch.save`; torch is not installed here); then load, concatenate in sorted
key order, L2-normalise, nan_to_num, sigmoid(Xw + b).

Run: flock /tmp/safe-fedllm-bench.lock python3 benches/detect_peer.py
"""

import os
import statistics
import tempfile
import time

import numpy as np

LAYERS, HIDDEN, KV, RANK, STEPS = 32, 4096, 1024, 8, 10


def adapter(rng):
    out = {}
    for layer in range(LAYERS):
        for module, dim_out in (("q_proj", HIDDEN), ("v_proj", KV)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{p}.lora_A.weight"] = (rng.random((RANK, HIDDEN), dtype=np.float32) - 0.5) * 0.02
            out[f"{p}.lora_B.weight"] = (rng.random((dim_out, RANK), dtype=np.float32) - 0.5) * 0.02
    return out


def first_b(state):
    return {k: v for k, v in state.items() if ".layers.0." in k and "lora_B" in k}


def one_client_round(base, steps, keys, w, b, workdir):
    paths = []
    for i, step in enumerate(steps):
        cur, ref = first_b(step), first_b(base)
        delta = {k: cur[k] - ref[k] for k in cur}
        path = os.path.join(workdir, f"client_0_step_{i + 1}.npz")
        np.savez(path, **delta)
        paths.append(path)
    rows = []
    for path in paths:
        with np.load(path) as d:
            rows.append(np.concatenate([d[k].reshape(-1) for k in keys]))
    x = np.stack(rows)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
    return 1.0 / (1.0 + np.exp(-(x @ w + b)))


def main():
    rng = np.random.default_rng(0)
    base = adapter(rng)
    steps = [adapter(rng) for _ in range(STEPS)]
    keys = sorted(first_b(base))
    dim = sum(first_b(base)[k].size for k in keys)
    w = (rng.random(dim, dtype=np.float32) - 0.5) * 2.0
    times = []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(15):
            t0 = time.perf_counter()
            one_client_round(base, steps, keys, w, 0.1, workdir)
            times.append(time.perf_counter() - t0)
    print(f"reference-style file round trip, 10 steps, d = {dim}: "
          f"median {statistics.median(times) * 1e3:.3f} ms over {len(times)} runs")


if __name__ == "__main__":
    main()
