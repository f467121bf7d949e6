"""ClientApp: a numpy 'fine-tuning' that returns a LoRA-shaped adapter."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from safe_fedllm.flower import array_record_to_numpy, numpy_to_array_record

from .task import client_update

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    malicious = context.node_config.get("malicious")
    if malicious is None:  # simulation: choose by partition id
        malicious = pid < int(context.run_config["num-malicious"])
    server_round = int(msg.content["config"]["server-round"])
    global_ = array_record_to_numpy(msg.content["arrays"])
    rng = np.random.default_rng(1000 * pid + server_round)
    update = client_update(global_, rng, bool(malicious))
    metrics = {
        "num-examples": 100,
        # Ground truth for the test's evaluation only; the defence never reads it.
        "e2e.malicious": int(bool(malicious)),
        "e2e.partition": pid,
    }
    content = RecordDict({"arrays": numpy_to_array_record(update), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
