"""Shared by the ServerApp and the ClientApp: LoRA-shaped numpy updates.

Benign clients move the adapter by small random noise; malicious clients add
a large move along one fixed direction (the signature the probe learns), as a
harmful fine-tuning run would. Deterministic per (partition, round).

`write_defense` is the offline phase, run by the test harness before `flwr
run`: it trains the probe on labelled runs and writes it beside a defense spec
that names it; the ServerApp gets that spec's path from the run_config.
"""

from __future__ import annotations

from pathlib import Path

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


DEFENSE_TOML = """\
# The e2e app's defense. The run_config names this file
# (safe-fedllm.spec-file); the detector level and the rule are declared in the
# app's [tool.flwr.app.config], so those run_config settings win over it.
[probe]
path = "probe.safetensors"

[admission]
require_probe_keys = true

[gate]
threshold = 0.2
"""


def train_probe():
    """The offline phase: labelled local runs from the base adapter."""
    import safe_fedllm as sf

    global_ = initial_global()
    rng = np.random.default_rng(7)
    runs = [(client_update(global_, rng, m), m) for m in [False] * 40 + [True] * 40]
    deltas = [sf.delta(u, global_) for u, _ in runs]
    # The plain fit at C = 1000 on these perfectly separable toy runs gives
    # saturated scores, which the tests' factor bounds (malicious < 0.05)
    # were written for; the calibrated default's Platt scaling makes them
    # less extreme.
    return sf.Probe.train(deltas, [m for _, m in runs], c=1000.0, threshold=0.8, calibrated=False)


def write_defense(folder: Path) -> Path:
    """Writes `probe.safetensors` and `defense.toml` (naming it) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "defense.toml"
    if not spec.exists():
        train_probe().save(folder / "probe.safetensors")
        spec.write_text(DEFENSE_TOML)
    return spec
