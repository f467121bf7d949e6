"""ClientApp: a numpy 'fine-tuning' that returns a LoRA-shaped adapter."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from safe_fedllm.client import ShadowBranch, feature_keys_from_config, record_steps
from safe_fedllm.flower import SHADOW_BASE_KEY, SHADOW_KEY, STEPS_KEY, array_record_to_numpy, numpy_to_array_record

from .task import client_update

app = ClientApp()
STEPS = 3


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    malicious = context.node_config.get("malicious")
    if malicious is None:  # simulation: choose by partition id
        malicious = pid < int(context.run_config["num-malicious"])
    config = msg.content["config"]
    server_round = int(config["server-round"])
    global_ = array_record_to_numpy(msg.content["arrays"])
    rng = np.random.default_rng(1000 * pid + server_round)
    keys = feature_keys_from_config(config)

    def run_from(start, steps=STEPS):
        """A 'fine-tuning' of `steps` steps from `start`, yielding every step."""
        target = client_update(start, rng, bool(malicious))
        for i in range(1, steps + 1):
            yield {k: (start[k] + (target[k] - start[k]) * (i / steps)).astype(np.float32) for k in start}

    trail = None
    if config.get("safe-fedllm.step-trail"):
        steps = run_from(global_)
        update, trail = record_steps(lambda: next(steps), STEPS, keys)
    else:
        *_, update = run_from(global_)
    metrics = {
        "num-examples": 100,
        # Ground truth for the test's evaluation only; the defence never reads it.
        "e2e.malicious": int(bool(malicious)),
        "e2e.partition": pid,
    }
    content = RecordDict({"arrays": numpy_to_array_record(update), "metrics": MetricRecord(metrics)})
    if trail is not None:
        content[STEPS_KEY] = numpy_to_array_record(trail.to_arrays())
    if config.get("safe-fedllm.shadow") and SHADOW_BASE_KEY in msg.content:
        branch = ShadowBranch(array_record_to_numpy(msg.content[SHADOW_BASE_KEY]), keys)
        content[SHADOW_KEY] = numpy_to_array_record(branch.run(lambda start, lr: run_from(start)).to_arrays())
    return Message(content=content, reply_to=msg)
