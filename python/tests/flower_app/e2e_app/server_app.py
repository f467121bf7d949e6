"""ServerApp: the Safe-FedLLM strategy, configured by the run_config alone
(`safe-fedllm.spec-file` and `safe-fedllm.spec.*`), for `num-server-rounds`;
writes a summary JSON."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from safe_fedllm.flower import SafeFedLLMStrategy, array_record_to_numpy, numpy_to_array_record

from .task import initial_global

app = ServerApp()


class RecordingStrategy(SafeFedLLMStrategy):
    """Keeps, per round, what the test evaluates: factors by node, the
    clients' ground-truth labels, and the distance of the new global to the
    benign clients' mean and to the plain mean."""

    def __init__(self, *args, kill_after_round: int = 0, **kwargs):
        # `kill_after_round` is the test's, not the defence's: the defence is the run_config's spec.
        super().__init__(*args, **kwargs)
        self.rounds: list[dict] = []
        self.kill_after_round = kill_after_round
        self._start_sha = ""

    def configure_train(self, server_round, arrays, config, grid):
        self._start_sha = digest(array_record_to_numpy(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        updates, labels = {}, {}
        for msg in replies:
            if msg.has_error():
                continue
            node = str(msg.metadata.src_node_id)
            updates[node] = array_record_to_numpy(msg.content["arrays"])
            labels[node] = int(msg.content["metrics"]["e2e.malicious"])
        benign = [u for n, u in updates.items() if not labels[n]]
        everyone = list(updates.values())
        new = array_record_to_numpy(arrays) if arrays is not None else self._global
        def dist(group):
            mean = {k: np.mean([u[k] for u in group], axis=0) for k in new}
            return float(max(np.abs(new[k] - mean[k]).max() for k in new))
        self.rounds.append({
            "server_round": server_round + self._offset,
            "start_sha": self._start_sha,
            "skipped": arrays is None,
            "factors": {n: metrics[f"factor.{n}"] for n in updates},
            "malicious": labels,
            "max_abs_to_benign_mean": dist(benign) if benign else None,
            "max_abs_to_plain_mean": dist(everyone),
        })
        if self.kill_after_round and server_round + self._offset == self.kill_after_round:
            os._exit(3)  # the ServerApp dies without any cleanup (the resume test)
        return arrays, metrics


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays' bytes in key order (to compare globals across runs)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k], dtype=np.float32).tobytes())
    return h.hexdigest()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = str(cfg["out-dir"]) or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    n = int(cfg["num-nodes"])
    global_ = initial_global()
    strategy = RecordingStrategy.from_run_config(
        cfg,
        audit_path=os.path.join(out_dir, "audit.jsonl"),
        state_path=os.path.join(out_dir, "state.npz"),
        kill_after_round=int(cfg["kill-after-round"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n,
        min_available_nodes=n,
    )
    result = strategy.start(grid=grid, initial_arrays=numpy_to_array_record(global_), num_rounds=int(cfg["num-server-rounds"]))
    summary = {"rounds": strategy.rounds, "final_keys": sorted(result.arrays.keys())}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    print("SAFE-FEDLLM-E2E " + json.dumps(summary), flush=True)
