#!/usr/bin/env python3
"""Side by side: Safe-FedLLM's Flower strategy vs Flower's plain FedAvg.

Times ``aggregate_train`` on the same replies:

* ``SafeFedLLMStrategy`` (client level + security-weighted FedAvg, default
  admission): parses the replies' arrays (zero-copy views), admits, scores
  every update with the probe, assesses, gates and aggregates in Rust;
* ``flwr.serverapp.strategy.FedAvg``: Flower's own weighted average.

Defaults are the issue's size: n = 20 clients, d = 3,407,872 (Llama-3.1-8B,
LoRA r = 8 on q_proj and v_proj: 32 layers × (8·4096 + 4096·8 + 8·4096 +
1024·8)). ``--layers 2`` gives a quick check at a small size.

    python scripts/bench_flower_strategy.py                 # full size (≈ 6 GB RAM)
    python scripts/bench_flower_strategy.py --layers 2 --repeats 2

Needs ``pip install flwr==1.42.0 numpy`` and the safe_fedllm wheel
(``pip install ./python``). Prints one line per strategy and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import safe_fedllm as sf
from safe_fedllm.flower import SafeFedLLMStrategy, numpy_to_array_record

KEY = "base_model.model.model.layers.{layer}.self_attn.{module}_proj.lora_{factor}.weight"
SHAPES = {("q", "A"): (8, 4096), ("q", "B"): (4096, 8), ("v", "A"): (8, 4096), ("v", "B"): (1024, 8)}


def adapter(layers: int, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {
        KEY.format(layer=l, module=m, factor=f): (rng.standard_normal(SHAPES[(m, f)], dtype=np.float32) * scale)
        for l in range(layers)
        for (m, f) in SHAPES
    }


def reply(node: int, arrays: dict[str, np.ndarray], samples: int) -> Message:
    md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                  group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": samples}),
    })
    return Message(content, metadata=md)


class Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    TaskIdentity.run_id = 1  # configure_train builds Messages
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1

    rng = np.random.default_rng(0)
    global_ = adapter(args.layers, rng, 0.01)
    d = sum(v.size for v in global_.values())
    replies = []
    for i in range(args.clients):
        delta = adapter(args.layers, rng, 1e-3)
        replies.append(reply(i + 1, {k: global_[k] + delta[k] for k in global_}, 100 + i))
    # A probe over first_layer_b (layer 0 lora_B of q and v: 40,960 features).
    spec = sf.FeatureSpec.fit([sf.delta(adapter(args.layers, rng, 1e-3), {k: np.zeros_like(v) for k, v in global_.items()})])
    weights = (rng.standard_normal(spec.dim, dtype=np.float32) * 0.01).astype(np.float32)
    probe = sf.Probe.from_weights(spec, weights, 0.0)

    global_record = numpy_to_array_record(global_)
    ours = SafeFedLLMStrategy(probe, spec={"detector": {"level": "client"}, "aggregator": {"rule": "fedavg"}},
                              fraction_evaluate=0.0,
                              min_available_nodes=args.clients, min_train_nodes=args.clients)
    ours.configure_train(1, global_record, ConfigRecord({}), Grid(args.clients))
    flower = FedAvg(fraction_evaluate=0.0)

    t_flower, (a_flower, _) = timed(lambda: flower.aggregate_train(1, replies), args.repeats)
    t_ours, (a_ours, m_ours) = timed(lambda: ours.aggregate_train(1, replies), args.repeats)
    assert a_ours is not None and a_flower is not None

    print(f"n = {args.clients}, d = {d:,}, median of {args.repeats}")
    print(f"flower FedAvg.aggregate_train                : {t_flower:8.3f} s")
    print(f"SafeFedLLMStrategy.aggregate_train (client+fedavg): {t_ours:8.3f} s")
    print(f"ratio safe-fedllm / flower                   : {t_ours / t_flower:8.2f}x")


if __name__ == "__main__":
    main()
