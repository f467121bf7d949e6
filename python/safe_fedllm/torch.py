"""A thin torch / PEFT layer over :mod:`safe_fedllm.client` (imports torch lazily).

>>> from safe_fedllm.torch import peft_arrays, set_peft_arrays, TorchStepTrail
>>> trail = TorchStepTrail(model, feature_keys)
>>> for batch in loader:
...     loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
...     trail.record()                       # copies only the probe's tensors
>>> update = peft_arrays(model)              # {peft key: float32 ndarray}

Collecting labelled runs for a probe (:mod:`safe_fedllm.probe_runs`):

>>> step = peft_train_step(model, lambda params: torch.optim.AdamW(params, lr=1e-4))
>>> collect_runs(step, peft_arrays(model), benign_batches, harmful_batches, "probe-runs", plan)

Install with ``pip install safe-fedllm[torch]`` (torch and peft); numpy-only
users never import this module.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .client import StepTrail
from ._native import canonical_key

__all__ = ["peft_arrays", "set_peft_arrays", "TorchStepTrail", "PeftTrainStep", "peft_train_step"]


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover
        raise ImportError("safe_fedllm.torch needs peft and torch: pip install 'safe-fedllm[torch]'") from exc
    return peft


def peft_arrays(model: Any, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``get_peft_model_state_dict(model)`` as float32 numpy arrays (CPU copies).

    ``keys`` (canonical names) restricts the copy, e.g. to the probe's feature keys.
    """
    state = _peft().get_peft_model_state_dict(model)
    wanted = None if keys is None else {canonical_key(k) or k for k in keys}
    out = {}
    for name, tensor in state.items():
        if wanted is not None and (canonical_key(name) or name) not in wanted:
            continue
        out[name] = tensor.detach().to("cpu").float().numpy().copy()
    return out


def set_peft_arrays(model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Loads numpy arrays (PEFT key names) into the model's adapter."""
    import torch

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    _peft().set_peft_model_state_dict(model, state)


class TorchStepTrail(StepTrail):
    """A :class:`StepTrail` that reads the probe's tensors straight from a PEFT model."""

    def __init__(self, model: Any, feature_keys: Iterable[str]) -> None:
        super().__init__(feature_keys)
        self.model = model

    def record(self, state: Mapping[str, np.ndarray] | None = None) -> None:  # type: ignore[override]
        """Records the model's current feature tensors (or ``state`` if given)."""
        super().record(state if state is not None else peft_arrays(self.model, self.feature_keys))


class PeftTrainStep:
    """A ``train_step(arrays, batch) -> arrays`` for :func:`safe_fedllm.probe_runs.collect_runs`
    over a PEFT model: loads ``arrays`` into the adapter, runs one optimiser step
    on ``batch`` and returns the adapter (PEFT key names, float32 numpy).

    ``start_run(seed)`` (called by ``collect_runs`` before each run) seeds torch
    and makes a fresh optimiser with ``make_optimizer(trainable parameters)``,
    so no run inherits another's optimiser state. ``loss(model, batch)`` gives
    the loss; by default ``model(**batch).loss`` (a Hugging Face batch with
    ``labels``). ``device`` moves a dict batch's tensors there first.
    """

    def __init__(
        self,
        model: Any,
        make_optimizer: Callable[[list[Any]], Any],
        loss: Callable[[Any, Any], Any] | None = None,
        device: Any = None,
    ) -> None:
        self.model = model
        self.make_optimizer = make_optimizer
        self.loss = loss
        self.device = device
        self.optimizer: Any = None

    def start_run(self, seed: int) -> None:
        """Seeds torch with ``seed`` and starts a fresh optimiser."""
        import torch

        torch.manual_seed(seed)
        self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def __call__(self, arrays: Mapping[str, np.ndarray], batch: Any) -> dict[str, np.ndarray]:
        if self.optimizer is None:
            self.start_run(0)
        set_peft_arrays(self.model, arrays)
        if self.device is not None and isinstance(batch, Mapping):
            batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
        self.model.train()
        loss = self.loss(self.model, batch) if self.loss is not None else self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return peft_arrays(self.model)


def peft_train_step(
    model: Any,
    make_optimizer: Callable[[list[Any]], Any],
    loss: Callable[[Any, Any], Any] | None = None,
    device: Any = None,
) -> PeftTrainStep:
    """A :class:`PeftTrainStep` (see there): the torch/PEFT ``train_step`` for
    :func:`safe_fedllm.probe_runs.collect_runs`."""
    return PeftTrainStep(model, make_optimizer, loss, device)
