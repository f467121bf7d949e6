"""ServerApp: offline probe phase (labelled local runs from the initial
adapter), then the Safe-FedLLM strategy the run_config's defense spec describes."""

from __future__ import annotations

import json
import os
import random

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import safe_fedllm as sf
from safe_fedllm.flower import SafeFedLLMStrategy, numpy_to_array_record

from .task import base_model, examples, fine_tune, peft_arrays

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
    deltas, labels = [], []
    for malicious in [False, True] * int(run["probe-runs"]):
        final, _ = fine_tune(model, initial, examples(malicious, rng, 32), steps, lr)
        deltas.append(sf.delta(final, initial))
        labels.append(malicious)
    probe = sf.Probe.train(deltas, labels, c=10.0, calibrate="max_f1")
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
