"""Type stubs of the Rust extension ``safe_fedllm._native``.

An *update* argument is either a dict ``{peft key: 2-D C-contiguous float32
ndarray}`` (read in place, without copying) or an :class:`Adapter`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Mapping, Sequence, TypedDict, Union

import numpy as np
import numpy.typing as npt

__version__: str

def set_num_threads(n: int) -> None:
    """Sizes the shared thread pool to ``n`` threads (once, before any other call;
    default: ``RAYON_NUM_THREADS``, else one per core). Raises ``InvalidParameterError``
    for 0 and ``ThreadPoolError`` when the pool already runs."""

Arrays = Mapping[str, npt.NDArray[np.float32]]
UpdateLike = Union[Arrays, "Adapter"]
Label = Union[bool, Literal["benign", "malicious"]]
PathLike = Union[str, os.PathLike[str]]

class Assessment(TypedDict):
    factor: float
    verdict: Literal["benign", "malicious", "undecided"]
    reason: str

class AggregationResult(TypedDict):
    skipped: bool
    skip_reason: Any
    new_global: dict[str, npt.NDArray[np.float32]] | None
    contributions: list[dict[str, Any]]
    exclusions: list[dict[str, Any]]

class Adapter:
    """An owned LoRA adapter (PEFT orientation, canonical key names)."""

    @staticmethod
    def from_arrays(arrays: UpdateLike) -> Adapter: ...
    @staticmethod
    def load(path: PathLike) -> Adapter: ...
    def save(self, path: PathLike, dtype: Literal["f32", "f16", "bf16", "float32", "float16", "bfloat16"] = "f32") -> None: ...
    def to_arrays(self) -> dict[str, npt.NDArray[np.float32]]: ...
    def keys(self) -> list[str]: ...
    def shapes(self) -> dict[str, tuple[int, int]]: ...
    @property
    def num_params(self) -> int: ...
    @property
    def rank(self) -> int | None: ...
    def check_finite(self) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str) -> bool: ...

def delta(update: UpdateLike, base: UpdateLike) -> Adapter:
    """``update − base`` (keys and shapes must match exactly)."""

def canonical_key(name: str) -> str | None:
    """The canonical PEFT name of a LoRA key, or None for a non-LoRA name."""

class FeatureSpec:
    """A frozen feature layout (which tensors, in which order, how scaled)."""

    @staticmethod
    def fit(deltas: Iterable[UpdateLike], selection: str | Sequence[str] | None = None, normalization: Literal["l2", "none"] = "l2") -> FeatureSpec: ...
    def transform(self, delta: UpdateLike) -> npt.NDArray[np.float32]: ...
    @property
    def dim(self) -> int: ...
    @property
    def keys(self) -> list[str]: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str) -> FeatureSpec: ...

class Probe:
    """The LoRA-Probe: P(malicious) = sigmoid(w·x + b)."""

    @staticmethod
    def train(
        deltas: Iterable[UpdateLike],
        labels: Iterable[Label],
        *,
        selection: str | Sequence[str] | None = None,
        normalization: Literal["l2", "none"] = "l2",
        c: float | None = None,
        max_iterations: int | None = None,
        threshold: float | None = None,
        calibrate: Literal["max_f1"] | float | None = None,
        calibration: tuple[Iterable[UpdateLike], Iterable[Label]] | None = None,
        calibrated: bool = True,
        c_grid: Sequence[float] | None = None,
        folds: int | None = None,
        seed: int | None = None,
        threshold_policy: str | None = None,
        groups: Sequence[int] | None = None,
    ) -> Probe: ...
    @staticmethod
    def from_weights(spec: FeatureSpec, weights: npt.NDArray[np.float32], bias: float, threshold: float = 0.8) -> Probe: ...
    def score(self, delta: UpdateLike) -> float: ...
    def score_update(self, update: UpdateLike, base: UpdateLike) -> float: ...
    def score_batch(self, deltas: Iterable[UpdateLike]) -> list[float]: ...
    def features(self, delta: UpdateLike) -> npt.NDArray[np.float32]: ...
    def is_harmful(self, score: float) -> bool: ...
    def with_threshold(self, threshold: float) -> Probe: ...
    @property
    def threshold(self) -> float: ...
    @property
    def spec(self) -> FeatureSpec: ...
    @property
    def feature_keys(self) -> list[str]: ...
    @property
    def weights(self) -> npt.NDArray[np.float32]: ...
    @property
    def bias(self) -> float: ...
    @property
    def info(self) -> dict[str, Any]: ...
    def save(self, path: PathLike) -> None: ...
    @staticmethod
    def load(path: PathLike) -> Probe: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> Probe: ...

class Detector:
    """A detector level ("step", "client", "shadow", "evidence") with its per-client state."""

    def __init__(self, level: Literal["step", "client", "shadow", "evidence"] = "client", **settings: Any) -> None: ...
    def assess(
        self,
        round: int,
        client: str,
        samples: int,
        *,
        steps: Sequence[float] | None = None,
        last_score: float | None = None,
        shadow_steps: Sequence[float] | None = None,
        shadow_last_score: float | None = None,
        threshold: float = 0.8,
    ) -> Assessment: ...
    def needs_shadow(self, client: str) -> bool: ...
    @property
    def level(self) -> str: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str) -> Detector: ...
    def copy(self) -> Detector: ...
    @property
    def settings(self) -> dict[str, Any]: ...

class Aggregator:
    """An aggregation rule: fedavg, median, trimmed_mean, krum, multi_krum, bulyan,
    geometric_median, norm_clipping, foolsgold, flame, dnc; settings as in the
    ``aggregator`` section of a defense spec. ``gate`` / ``skip_avg_weight``
    wrap it for standalone use (a DefendedRound refuses a wrapped rule)."""

    def __init__(
        self,
        rule: str = "fedavg",
        *,
        gate: bool | float | None = None,
        skip_avg_weight: float | None = None,
        **settings: Any,
    ) -> None: ...
    def aggregate(
        self,
        global_: UpdateLike,
        updates: Iterable[tuple[str, UpdateLike, int] | tuple[str, UpdateLike, int, float]],
    ) -> AggregationResult: ...
    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> dict[str, Any]: ...

class Report(TypedDict, total=False):
    client: str
    update: UpdateLike
    samples: int
    steps: Sequence[UpdateLike] | Sequence[float] | None
    shadow: Sequence[UpdateLike] | Sequence[float] | None
    # A reply the caller could not use (failed, dropped): a reason or (code, detail).
    # The round's admission rejects it; it counts 0 in the safety gate.
    refused: str | tuple[str, str]

def check_spec(spec: Mapping[str, Any] | PathLike, *, base_dir: PathLike | None = None) -> dict[str, Any]:
    """Checks a defense spec; returns ``{"spec": canonical dict, "spec_sha256": hex}``."""

class DefendedRound:
    """admission -> probe -> detector level -> safety gate -> rule, with an audit line."""

    def __init__(
        self,
        probe: Probe,
        detector: Detector,
        aggregator: Aggregator,
        *,
        skip_avg_weight: float = 0.2,
        trail: Literal["exact", "off"] | Mapping[str, float] | None = None,
        admission: Literal["reference"] | Mapping[str, Any] | None = None,
        accept_self_reported: bool = False,
        shadow_base: UpdateLike | None = None,
        shadow_learning_rate: float = 5e-5,
    ) -> None: ...
    @staticmethod
    def from_spec(
        spec: Mapping[str, Any] | PathLike,
        *,
        probe: Probe | None = None,
        base_dir: PathLike | None = None,
        shadow_base: UpdateLike | None = None,
        shadow_learning_rate: float = 5e-5,
    ) -> DefendedRound: ...
    @property
    def spec(self) -> dict[str, Any]: ...
    @property
    def spec_sha256(self) -> str: ...
    @property
    def probe(self) -> Probe: ...
    def run(self, round: int, global_: UpdateLike, reports: Iterable[Report]) -> dict[str, Any]: ...
    def needs_shadow(self, client: str) -> bool: ...
    @property
    def detector(self) -> Detector: ...
    def detector_json(self) -> str: ...
    def load_detector_json(self, text: str) -> None: ...
    @property
    def level(self) -> str: ...
