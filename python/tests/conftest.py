"""Shared fixtures: LoRA-shaped numpy updates and a probe trained on them."""

from __future__ import annotations

import numpy as np
import pytest

import safe_fedllm as sf

LAYERS = 2
RANK = 4
D_MODEL = 16
KEY = "base_model.model.model.layers.{layer}.self_attn.{module}_proj.lora_{factor}.weight"


def keys() -> list[str]:
    return [KEY.format(layer=l, module=m, factor=f) for l in range(LAYERS) for m in "qv" for f in "AB"]


def lora_like(rng: np.random.Generator, scale: float = 0.1) -> dict[str, np.ndarray]:
    out = {}
    for k in keys():
        shape = (RANK, D_MODEL) if ".lora_A." in k else (D_MODEL, RANK)
        out[k] = (rng.normal(size=shape) * scale).astype(np.float32)
    return out


def direction(seed: int) -> dict[str, np.ndarray]:
    """A fixed unit direction in update space (the 'malicious' signature)."""
    rng = np.random.default_rng(seed)
    d = lora_like(rng, 1.0)
    norm = np.sqrt(sum(float((v * v).sum()) for v in d.values()))
    return {k: (v / norm).astype(np.float32) for k, v in d.items()}


MALICIOUS_DIR = direction(12345)


def client_update(global_: dict[str, np.ndarray], rng: np.random.Generator, malicious: bool, step: float = 0.05) -> dict[str, np.ndarray]:
    """global + small benign noise (+ a large move along the malicious direction)."""
    out = {}
    for k, g in global_.items():
        delta = rng.normal(size=g.shape).astype(np.float32) * step
        if malicious:
            delta = delta + MALICIOUS_DIR[k] * (step * 40.0)
        out[k] = (g + delta).astype(np.float32)
    return out


@pytest.fixture(scope="session")
def global_arrays() -> dict[str, np.ndarray]:
    return lora_like(np.random.default_rng(0))


@pytest.fixture(scope="session")
def probe(global_arrays: dict[str, np.ndarray]) -> sf.Probe:
    rng = np.random.default_rng(1)
    benign = [client_update(global_arrays, rng, False) for _ in range(30)]
    malicious = [client_update(global_arrays, rng, True) for _ in range(30)]
    deltas = [sf.delta(u, global_arrays) for u in benign + malicious]
    return sf.Probe.train(deltas, [False] * 30 + [True] * 30, c=10.0, threshold=0.5)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(42)
