"""Shared by the ServerApp and the ClientApp: LoRA-shaped numpy updates.

Benign clients move the adapter by small random noise; malicious clients add
a large move along one fixed direction (the signature the probe learns), as a
harmful fine-tuning run would. Deterministic per (partition, round).
"""

from __future__ import annotations

import numpy as np

LAYERS, RANK, D_MODEL = 2, 8, 64
KEY = "base_model.model.model.layers.{layer}.self_attn.{module}_proj.lora_{factor}.weight"
STEP = 0.05


def keys() -> list[str]:
    return [KEY.format(layer=l, module=m, factor=f) for l in range(LAYERS) for m in "qv" for f in "AB"]


def shape(key: str) -> tuple[int, int]:
    return (RANK, D_MODEL) if ".lora_A." in key else (D_MODEL, RANK)


def initial_global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.normal(size=shape(k)) * 0.1).astype(np.float32) for k in keys()}


def malicious_direction() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12345)
    d = {k: rng.normal(size=shape(k)) for k in keys()}
    norm = np.sqrt(sum(float((v * v).sum()) for v in d.values()))
    return {k: (v / norm).astype(np.float32) for k, v in d.items()}


def client_update(global_: dict[str, np.ndarray], rng: np.random.Generator, malicious: bool) -> dict[str, np.ndarray]:
    direction = malicious_direction()
    out = {}
    for k in keys():
        g = global_[k]
        delta = rng.normal(size=g.shape).astype(np.float32) * STEP
        if malicious:
            delta = delta + direction[k] * (STEP * 40.0)
        out[k] = (g + delta).astype(np.float32)
    return out
