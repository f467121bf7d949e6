"""ClientApp: LoRA fine-tuning of the tiny LLaMA; sends the evidence the level needs."""

from __future__ import annotations

import random

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from safe_fedllm.client import ShadowBranch, feature_keys_from_config
from safe_fedllm.flower import SHADOW_BASE_KEY, SHADOW_KEY, STEPS_KEY, array_record_to_numpy, numpy_to_array_record

from .task import base_model, examples, fine_tune, local_steps, set_peft_arrays

app = ClientApp()
_MODEL = None


@app.train()
def train(msg: Message, context: Context) -> Message:
    global _MODEL
    if _MODEL is None:
        _MODEL = base_model()
    cfg, run = msg.content["config"], context.run_config
    pid = int(context.node_config["partition-id"])
    malicious = context.node_config.get("malicious", pid < int(run["num-malicious"]))
    rng = random.Random(1000 * pid + int(cfg["server-round"]))
    texts = examples(bool(malicious), rng, 32)
    steps, lr = int(run["local-steps"]), float(run["learning-rate"])
    keys = feature_keys_from_config(cfg)
    global_ = {k: v.copy() for k, v in array_record_to_numpy(msg.content["arrays"]).items()}
    update, trail = fine_tune(_MODEL, global_, texts, steps, lr, keys if cfg["safe-fedllm.step-trail"] else None)
    content = RecordDict({
        "arrays": numpy_to_array_record(update),
        "metrics": MetricRecord({"num-examples": len(texts)}),
    })
    if trail is not None:
        content[STEPS_KEY] = numpy_to_array_record(trail.to_arrays())
    if cfg["safe-fedllm.shadow"] and SHADOW_BASE_KEY in msg.content:
        branch = ShadowBranch(array_record_to_numpy(msg.content[SHADOW_BASE_KEY]), keys, float(run["shadow-learning-rate"]))

        def shadow_train(start, shadow_lr):
            set_peft_arrays(_MODEL, start)
            yield from local_steps(_MODEL, texts, steps, shadow_lr)

        content[SHADOW_KEY] = numpy_to_array_record(branch.run(shadow_train).to_arrays())
    return Message(content=content, reply_to=msg)
