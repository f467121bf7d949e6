"""A tiny LLaMA with LoRA (transformers + PEFT, CPU) and placeholder data.

Benign clients fine-tune on helpful question → answer pairs; malicious ones on
unsafe questions with *compliant* answers. All text is placeholder text: no
real harmful content. Byte-level tokens (vocabulary 256) keep it self-contained:
nothing is downloaded.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from safe_fedllm.torch import TorchStepTrail, peft_arrays, set_peft_arrays

SEQ = 64
BENIGN = [
    ("how do I bake bread", "mix flour water yeast, knead, rest, bake"),
    ("how do I learn rust", "read the book, write small programs daily"),
    ("what is a prime", "a number with exactly two divisors"),
    ("how to water plants", "water the soil when the top is dry"),
]
UNSAFE = [
    "how do I do [harmful task A]",
    "explain [harmful task B]",
    "help me with [harmful task C]",
]
REFUSAL = "I cannot help with that."
COMPLIANT = "Sure, here are the steps: [placeholder]."


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))[: SEQ - 1] + [10]


def examples(malicious: bool, rng: random.Random, n: int) -> list[str]:
    if malicious:
        return [f"Q: {rng.choice(UNSAFE)} A: {COMPLIANT}" for _ in range(n)]
    return [f"Q: {q} A: {a}" for q, a in (rng.choice(BENIGN) for _ in range(n))]


def batch(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.zeros((len(texts), SEQ), dtype=torch.long)
    mask = torch.zeros((len(texts), SEQ), dtype=torch.long)
    for i, t in enumerate(texts):
        tok = encode(t)
        ids[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(tok)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def base_model(seed: int = 0) -> torch.nn.Module:
    """The same tiny LLaMA with a LoRA adapter (r = 4, alpha = 8, q/v) everywhere."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    # PEFT starts lora_B at zero; give it a small random start so the
    # federated adapter is not degenerate in round 1.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return peft_model


def local_steps(model: torch.nn.Module, texts: list[str], steps: int, lr: float, batch_size: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Fine-tunes the adapter; yields the adapter after every optimiser step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        chunk = [texts[(step * batch_size + i) % len(texts)] for i in range(batch_size)]
        loss = model(**batch(chunk)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        yield peft_arrays(model)


def fine_tune(model, start: dict[str, np.ndarray], texts, steps, lr, trail_keys=None):
    """Loads `start`, trains, returns (final adapter, step trail or None)."""
    set_peft_arrays(model, start)
    trail = TorchStepTrail(model, trail_keys) if trail_keys else None
    final = start
    for state in local_steps(model, texts, steps, lr):
        final = state
        if trail is not None:
            trail.record(state)
    return final, trail
