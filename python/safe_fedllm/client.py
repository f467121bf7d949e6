"""Client-side helpers: record the step trail and run the shadow branch.

Framework-agnostic: a "model state" is a mapping ``{peft key: float32
ndarray}`` (what ``get_peft_model_state_dict`` gives, converted to numpy), and
training is a callable you supply. :mod:`safe_fedllm.torch` adapts a PEFT
model to these callables.

What the server can verify, and what is self-reported
-----------------------------------------------------
* **The update** (final adapter): the server has it and recomputes its score
  itself. Client level reads only this: nothing is taken on trust.
* **The step trail** (main branch, ``level="step"``): the adapter's probe
  feature tensors after every local step. The server scores every step itself
  and checks that the *last* step equals the update exactly (the trail
  check). Intermediate steps are still the client's word: a client could send
  a fabricated benign-looking path that ends at its real update.
* **The shadow branch** (``level="shadow"``/``"evidence"``): a second run
  from the fixed shadow base on the client's own data. The server scores the
  steps, but cannot check them against anything: self-reported.
* **Scores sent as numbers**: entirely self-reported; use only with trusted
  client code or in simulation.
* **num-examples**: self-reported; the server's admission policy caps it.

Only the probe's feature keys are recorded, so the extra payload is small
(for Llama-3.1-8B with r = 8 on q/v and ``first_layer_b``: 40,960 values per
step, against 3.4 M in the update).

>>> trail = StepTrail(feature_keys)
>>> for _ in range(steps):
...     state = train_one_step()          # returns {peft key: ndarray}
...     trail.record(state)
>>> reply_arrays = trail.to_arrays()      # {"0/<key>": ..., "1/<key>": ...}
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

from ._native import canonical_key

__all__ = ["StepTrail", "ShadowBranch", "feature_keys_from_config", "record_steps"]

#: The reference shadow learning rate.
DEFAULT_SHADOW_LEARNING_RATE = 5e-5


def feature_keys_from_config(config: Mapping[str, object]) -> list[str]:
    """The probe's feature keys the strategy put in the train config."""
    raw = config.get("safe-fedllm.feature-keys", "")
    return [k for k in str(raw).split(",") if k]


class StepTrail:
    """The probe's feature tensors after each local step, copied (float32).

    ``feature_keys`` are canonical PEFT names (``Probe.feature_keys`` or the
    strategy's config); state keys may use any PEFT spelling
    (``…lora_B.default.weight``): they are matched by canonical name.
    """

    def __init__(self, feature_keys: Iterable[str]) -> None:
        self.feature_keys = [canonical_key(k) or k for k in feature_keys]
        if not self.feature_keys:
            raise ValueError("a step trail needs at least one feature key")
        self._steps: list[dict[str, np.ndarray]] = []

    def record(self, state: Mapping[str, np.ndarray]) -> None:
        """Copies the feature tensors of ``state`` (the adapter after a step)."""
        by_canonical = {canonical_key(k) or k: k for k in state}
        step = {}
        for key in self.feature_keys:
            name = by_canonical.get(key)
            if name is None:
                raise KeyError(f"state lacks feature tensor {key!r}")
            step[name] = np.array(state[name], dtype=np.float32, copy=True, order="C")
        self._steps.append(step)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> list[dict[str, np.ndarray]]:
        """The recorded steps, in order."""
        return list(self._steps)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"<step>/<key>": ndarray}``: the layout the Flower strategy reads."""
        return {f"{i}/{k}": a for i, step in enumerate(self._steps) for k, a in step.items()}


def record_steps(
    step: Callable[[], Mapping[str, np.ndarray]], num_steps: int, feature_keys: Iterable[str]
) -> tuple[dict[str, np.ndarray], StepTrail]:
    """Runs ``step()`` ``num_steps`` times, recording the trail; returns the
    final state and the trail. The final state is the update to send: the
    trail's last step equals it, which the server checks."""
    trail = StepTrail(feature_keys)
    state: Mapping[str, np.ndarray] = {}
    for _ in range(num_steps):
        state = step()
        trail.record(state)
    return dict(state), trail


class ShadowBranch:
    """The shadow run: the same local steps on the same data, from the fixed
    shadow base (the round-0 adapter the server sends) at a fixed learning rate.

    ``train(start, learning_rate)`` is your training loop: it receives a copy
    of the base and the learning rate and yields the adapter after each step.
    """

    def __init__(
        self,
        base: Mapping[str, np.ndarray],
        feature_keys: Iterable[str],
        learning_rate: float = DEFAULT_SHADOW_LEARNING_RATE,
    ) -> None:
        if not (learning_rate > 0 and np.isfinite(learning_rate)):
            raise ValueError("the shadow learning rate must be finite and > 0")
        self.base = {k: np.array(v, dtype=np.float32, copy=True) for k, v in base.items()}
        self.feature_keys = list(feature_keys)
        self.learning_rate = float(learning_rate)

    def start(self) -> dict[str, np.ndarray]:
        """A fresh copy of the base to train on."""
        return {k: v.copy() for k, v in self.base.items()}

    def run(
        self, train: Callable[[dict[str, np.ndarray], float], Iterable[Mapping[str, np.ndarray]]]
    ) -> StepTrail:
        """Runs the shadow training and returns its step trail (feature keys only)."""
        trail = StepTrail(self.feature_keys)
        for state in train(self.start(), self.learning_rate):
            trail.record(state)
        return trail
