"""ServerApp: offline probe phase (labelled local runs from the initial
adapter, collected with safe_fedllm.probe_runs), then the Safe-FedLLM strategy
the run_config's defense spec describes."""

from __future__ import annotations

import json
import os
import random

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from safe_fedllm.flower import SafeFedLLMStrategy, numpy_to_array_record
from safe_fedllm.probe_runs import RunPlan, build_probe, collect_runs
from safe_fedllm.torch import peft_train_step

from .task import base_model, batch, examples, peft_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    out_dir = str(run["out-dir"]) or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    model = base_model()
    initial = peft_arrays(model)
    steps, lr = int(run["local-steps"]), float(run["learning-rate"])
    rng = random.Random(7)
    benign = [batch(examples(False, rng, 4)) for _ in range(32)]
    harmful = [batch(examples(True, rng, 4)) for _ in range(32)]
    step = peft_train_step(model, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    plan = RunPlan(runs_per_class=int(run["probe-runs"]), steps=steps, seed=7)
    manifest = collect_runs(step, initial, benign, harmful, os.path.join(out_dir, "probe-runs"), plan, overwrite=True)
    probe = build_probe(manifest, threshold_policy="max-f1", out=os.path.join(out_dir, "probe.safetensors"))
    n = int(run["num-nodes"])
    # The defence is the run_config's spec (safe-fedllm.spec.*); the probe
    # trained above is the one it scores with.
    strategy = SafeFedLLMStrategy.from_run_config(
        run,
        probe=probe,
        audit_path=os.path.join(out_dir, "audit.jsonl"),
        state_path=os.path.join(out_dir, "state.npz"),
        fraction_evaluate=0.0,
        min_train_nodes=n,
        min_available_nodes=n,
    )
    result = strategy.start(grid=grid, initial_arrays=numpy_to_array_record(initial), num_rounds=int(run["num-server-rounds"]))
    print("train metrics per round:", json.dumps({r: dict(m) for r, m in result.train_metrics_clientapp.items()}, default=str))
