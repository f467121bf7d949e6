"""A thin torch / PEFT layer over :mod:`safe_fedllm.client` (imports torch lazily).

>>> from safe_fedllm.torch import peft_arrays, set_peft_arrays, TorchStepTrail
>>> trail = TorchStepTrail(model, feature_keys)
>>> for batch in loader:
...     loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
...     trail.record()                       # copies only the probe's tensors
>>> update = peft_arrays(model)              # {peft key: float32 ndarray}

Install with ``pip install safe-fedllm[torch]`` (torch and peft); numpy-only
users never import this module.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from .client import StepTrail
from ._native import canonical_key

__all__ = ["peft_arrays", "set_peft_arrays", "TorchStepTrail"]


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
