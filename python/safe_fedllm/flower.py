"""A Flower (≥ 1.42, Message API) strategy that runs Safe-FedLLM's defended round.

:class:`SafeFedLLMStrategy` subclasses :class:`flwr.serverapp.strategy.FedAvg`
and overrides only ``configure_train`` (to keep the global arrays, which
``aggregate_train`` does not receive) and ``aggregate_train`` (to run the
defence). Everything else — sampling, evaluation, the ``start`` loop — is
Flower's own.

>>> from safe_fedllm import Probe
>>> from safe_fedllm.flower import SafeFedLLMStrategy, AdmissionPolicy
>>> strategy = SafeFedLLMStrategy(
...     Probe.load("probe.safetensors"), level="client", rule="fedavg",
...     admission=AdmissionPolicy(samples="cap_at", sample_value=10_000),
...     audit_path="audit.jsonl", checkpoint_path="detector.json",
...     fraction_evaluate=0.0, min_available_nodes=4)
>>> result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

Per round it

1. admits each reply (:class:`AdmissionPolicy`): a reply that is not a LoRA
   update (no ArrayRecord, non-float32 or non-2-D arrays, non-LoRA names, no
   integer ``num-examples``) is excluded here; the Rust admission stage then
   rejects wrong keys/shapes, non-finite values, missing probe keys and
   updates beyond the norm bound, and caps declared sample counts. A bad
   reply is excluded with a typed reason; it can never fail the round for
   everyone;
2. runs :class:`safe_fedllm.DefendedRound` on the admitted clients: the probe
   scores each update (and its step trail / shadow branch when the level reads
   them), the detector level turns scores into a security factor, the safety
   gate skips the round when the mean factor is below ``skip_avg_weight``, and
   the chosen rule aggregates;
3. returns the new global ``ArrayRecord``, or ``None`` for a skipped round
   (Flower keeps the global model), with a ``MetricRecord`` holding the
   per-client factors, verdicts and exclusions (keys ``factor.<node_id>``,
   ``verdict.<node_id>`` = 1 malicious / 0 benign / −1 undecided,
   ``excluded.<node_id>`` = 1/0) and round totals;
4. appends one JSON line to ``audit_path`` and writes the detector state to
   ``checkpoint_path``, so a restarted ServerApp resumes with the same
   per-client memory.

Clients are identified by ``msg.metadata.src_node_id``: a node id is assigned
by the SuperLink, not claimed by the client.

What the server verifies and what is self-reported: the update itself is the
evidence for the client level (its last step): verified. A step trail sent as
arrays is scored by the server and its last step is checked against the update
(verified consistency; intermediate steps are still the client's word). A
shadow branch is trained on the client's data: self-reported. Scores sent as
numbers (``safe-fedllm.step-scores``) are self-reported. The audit records
which kind each client sent.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from typing import Any, Iterable

import numpy as np

from . import _native
from .errors import SafeFedLLMError

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("safe_fedllm.flower needs Flower: pip install 'flwr>=1.42'") from exc

__all__ = [
    "AdmissionPolicy",
    "SafeFedLLMStrategy",
    "STEPS_KEY",
    "SHADOW_KEY",
    "SHADOW_BASE_KEY",
    "STEP_SCORES_KEY",
    "array_record_to_numpy",
    "numpy_to_array_record",
]

#: Reply ArrayRecord with the main branch's step trail (keys ``"<step>/<peft key>"``).
STEPS_KEY = "safe-fedllm.steps"
#: Reply ArrayRecord with the shadow branch's step trail (same key format).
SHADOW_KEY = "safe-fedllm.shadow"
#: Message ArrayRecord carrying the fixed shadow base to the clients.
SHADOW_BASE_KEY = "safe-fedllm.shadow-base"
#: Reply MetricRecord key of self-reported step scores (unverifiable).
STEP_SCORES_KEY = "safe-fedllm.step-scores"
#: Reply MetricRecord key of self-reported shadow step scores (unverifiable).
SHADOW_SCORES_KEY = "safe-fedllm.shadow-scores"

_VERDICT_CODE = {"benign": 0, "malicious": 1, "undecided": -1}


@dataclass(frozen=True)
class AdmissionPolicy:
    """What a reply must satisfy before the defence looks at it.

    The adversary controls its whole reply, including ``num-examples`` (its
    FedAvg weight). The checks run in two places: this module rejects what
    is not a LoRA update at all (no ArrayRecord, a non-float32 or non-2-D
    array, a tensor name that is not a LoRA A/B key, a ``num-examples`` that
    is missing or not a non-negative integer); the Rust round's admission
    stage then checks keys and shapes against the global adapter, finiteness,
    the presence of the probe's keys, the norm bound and the sample policy,
    and records a typed rejection in the audit. Defaults fail closed.

    * ``samples``: ``"cap_at_median_multiple"`` (default, ``sample_value`` =
      1.0: no client weighs more than the round's lower median count),
      ``"cap_at"`` (``sample_value`` = the largest count a client can hold),
      ``"uniform"`` (ignore counts) or ``"trust"`` (the reference; unsafe).
    * ``norm_bound``: ``"median_multiple"`` (default, ``norm_value`` = 1.0:
      updates are clipped to the round's lower median norm),
      ``"absolute"`` (``norm_value`` = the bound on ‖update − global‖₂) or
      ``None`` (unbounded); ``over_bound``: ``"clip"`` (default) or ``"exclude"``.

    The defaults are the Rust ``Admission::default()``: each admitted client
    pulls the global by at most one median client's worth.
    * ``require_probe_keys``: reject an update without the probe's tensors.
    """

    samples: str = "cap_at_median_multiple"
    sample_value: float | None = 1.0
    norm_bound: str | None = "median_multiple"
    norm_value: float | None = 1.0
    over_bound: str = "clip"
    require_probe_keys: bool = True

    @classmethod
    def reference(cls) -> "AdmissionPolicy":
        """The reference implementation's trust (for reproducing the paper only)."""
        return cls(samples="trust", sample_value=None, norm_bound=None, norm_value=None, require_probe_keys=False)

    def to_native(self) -> dict[str, Any]:
        """The policy as :class:`safe_fedllm.DefendedRound` takes it."""
        if self.samples in ("trust", "uniform"):
            samples: Any = self.samples
        elif self.samples == "cap_at":
            samples = {"cap_at": int(self.sample_value or 0)}
        else:
            samples = {self.samples: float(self.sample_value if self.sample_value is not None else 1.0)}
        bound: Any = None if self.norm_bound is None else {self.norm_bound: float(self.norm_value or 0.0)}
        return {
            "samples": samples,
            "norm_bound": bound,
            "over_bound": self.over_bound,
            "require_probe_keys": self.require_probe_keys,
        }

    @staticmethod
    def declared_samples(raw: Any) -> int:
        """The declared count as an int; raises ValueError for anything else."""
        if isinstance(raw, bool) or raw is None:
            raise ValueError(f"num-examples {raw!r} is not an integer")
        if isinstance(raw, float):
            if not (math.isfinite(raw) and raw == int(raw)):
                raise ValueError(f"num-examples {raw!r} is not an integer")
            raw = int(raw)
        if not isinstance(raw, (int, np.integer)) or raw < 0:
            raise ValueError(f"num-examples {raw!r} is not a non-negative integer")
        return min(int(raw), 2**63 - 1)


_NPY_MAGIC = b"\x93NUMPY"
# The header numpy writes for a C-order little-endian float32 matrix; anything
# else goes through numpy's own (slower, literal_eval-based) header parser.
_F32_MATRIX_HEADER = re.compile(
    rb"\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n"
)


def _npy_view(arr: Array) -> np.ndarray:
    """A read-only view of an ``Array``'s bytes as an ndarray, without copying.

    Parses the ``.npy`` header itself (no pickle is ever allowed) and returns
    ``np.frombuffer`` over the message bytes; falls back to ``Array.numpy()``
    for anything unusual (made C-contiguous, so a Fortran-order upload is
    read correctly) so the caller's checks see the real dtype.
    """
    data = arr.data
    if arr.stype != "numpy.ndarray" or not isinstance(data, (bytes, bytearray)):
        return np.ascontiguousarray(arr.numpy())
    if data[:6] == _NPY_MAGIC and data[6:8] == b"\x01\x00" and len(data) >= 10:
        header_len = int.from_bytes(data[8:10], "little")
        match = _F32_MATRIX_HEADER.fullmatch(data, 10, 10 + header_len)
        if match is not None:
            rows, cols = int(match.group(1)), int(match.group(2))
            offset = 10 + header_len
            if len(data) - offset != rows * cols * 4:
                raise ValueError(f"array bytes hold {len(data) - offset} bytes, shape ({rows}, {cols}) needs {rows * cols * 4}")
            return np.frombuffer(data, dtype=np.float32, count=rows * cols, offset=offset).reshape(rows, cols)
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            return np.ascontiguousarray(arr.numpy())
    except ValueError:
        return np.ascontiguousarray(arr.numpy())
    if dtype != np.dtype("<f4") or fortran or dtype.hasobject:
        return np.ascontiguousarray(arr.numpy())
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset = buf.tell()
    if len(data) - offset != count * 4:
        raise ValueError(f"array bytes hold {len(data) - offset} bytes, shape {shape} needs {count * 4}")
    return np.frombuffer(data, dtype=np.float32, count=count, offset=offset).reshape(shape)


def array_record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord; float32 arrays are zero-copy views."""
    return {name: _npy_view(arr) for name, arr in record.items()}


def numpy_to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ndarrays (keys kept, order kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def _split_trail(record: ArrayRecord | None) -> list[dict[str, np.ndarray]] | None:
    """Step trail ``{"<i>/<key>": a}`` → list of per-step dicts, in step order."""
    if record is None:
        return None
    steps: dict[int, dict[str, np.ndarray]] = {}
    for name, arr in record.items():
        index, sep, key = name.partition("/")
        if not sep or not index.isdigit():
            raise ValueError(f"step trail key {name!r} is not '<step>/<tensor key>'")
        steps.setdefault(int(index), {})[key] = _npy_view(arr)
    if sorted(steps) != list(range(len(steps))):
        raise ValueError("step trail indices are not 0..n-1")
    return [steps[i] for i in range(len(steps))]


class SafeFedLLMStrategy(FedAvg):
    """FedAvg with the Safe-FedLLM defence in ``aggregate_train``.

    Parameters
    ----------
    probe:
        A trained :class:`safe_fedllm.Probe` (or the path of a saved one).
    level:
        Detector level: ``"client"`` (default: needs nothing from clients but
        their update), ``"step"`` (needs a step trail), ``"shadow"`` or
        ``"evidence"`` (need a shadow branch).
    detector_settings:
        Keyword arguments of :class:`safe_fedllm.Detector` (threshold, …).
    rule, rule_settings:
        The aggregation rule and its settings (:class:`safe_fedllm.Aggregator`).
    skip_avg_weight:
        Safety gate: skip the round when the mean security factor is below it.
    admission:
        :class:`AdmissionPolicy` (defaults are meant for untrusted clients).
    audit_path:
        JSON-lines file, one line per round (appended).
    checkpoint_path:
        JSON file with the detector state (and the shadow base, next to it as
        ``.npz``), rewritten atomically after each round and loaded at start.
    **fedavg_kwargs:
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        probe: _native.Probe | str | os.PathLike[str],
        *,
        level: str = "client",
        detector_settings: dict[str, Any] | None = None,
        rule: str = "fedavg",
        rule_settings: dict[str, Any] | None = None,
        skip_avg_weight: float = 0.2,
        trail: str | float = "exact",
        admission: AdmissionPolicy | None = None,
        audit_path: str | os.PathLike[str] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.probe = probe if isinstance(probe, _native.Probe) else _native.Probe.load(os.fspath(probe))
        self.level = level
        self.detector_settings = dict(detector_settings or {})
        self.rule = rule
        self.rule_settings = dict(rule_settings or {})
        self.skip_avg_weight = skip_avg_weight
        self.trail = trail
        self.admission = admission or AdmissionPolicy()
        self.audit_path = os.fspath(audit_path) if audit_path is not None else None
        self.checkpoint_path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
        self._global: dict[str, np.ndarray] | None = None
        self._global_record: ArrayRecord | None = None
        self._shadow_base: dict[str, np.ndarray] | None = None
        self._round: _native.DefendedRound | None = None
        self.last_outcome: dict[str, Any] | None = None
        self._build_round()
        self._resume()

    # -- set-up -----------------------------------------------------------

    def _build_round(self) -> None:
        detector = _native.Detector(self.level, **self.detector_settings)
        aggregator = _native.Aggregator(self.rule, **self.rule_settings)
        self._round = _native.DefendedRound(
            self.probe,
            detector,
            aggregator,
            skip_avg_weight=self.skip_avg_weight,
            trail=self.trail,
            admission=self.admission.to_native(),
            shadow_base=self._shadow_base,
        )

    def _shadow_base_path(self) -> str | None:
        return None if self.checkpoint_path is None else self.checkpoint_path + ".shadow-base.npz"

    def _resume(self) -> None:
        """Loads the detector state (and shadow base) written by a previous run."""
        if self.checkpoint_path is None or not os.path.exists(self.checkpoint_path):
            return
        with open(self.checkpoint_path, encoding="utf-8") as f:
            saved = json.load(f)
        base_path = self._shadow_base_path()
        if base_path and os.path.exists(base_path):
            with np.load(base_path, allow_pickle=False) as npz:
                self._shadow_base = {k: np.ascontiguousarray(npz[k], dtype=np.float32) for k in npz.files}
            self._build_round()
        assert self._round is not None
        self._round.load_detector_json(json.dumps(saved["detector"]))
        log(INFO, "safe-fedllm: resumed detector state of server round %s from %s", saved.get("server_round"), self.checkpoint_path)

    def _checkpoint(self, server_round: int) -> None:
        if self.checkpoint_path is None or self._round is None:
            return
        base_path = self._shadow_base_path()
        if base_path and self._shadow_base is not None and not os.path.exists(base_path):
            tmp = base_path + ".tmp.npz"
            np.savez(tmp, **self._shadow_base)
            os.replace(tmp, base_path)
        state = {"server_round": server_round, "level": self.level, "detector": json.loads(self._round.detector_json())}
        tmp = self.checkpoint_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    def summary(self) -> None:
        """Logs Flower's summary and the defence settings."""
        super().summary()
        log(INFO, "\t└──> Safe-FedLLM: level=%s rule=%s skip_avg_weight=%s admission=%s",
            self.level, self.rule, self.skip_avg_weight, asdict(self.admission))

    # -- Flower hooks -----------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keeps the global arrays, tells clients what evidence to send, then samples as FedAvg."""
        self._global_record = arrays
        self._global = array_record_to_numpy(arrays)
        uses_shadow = self.level in ("shadow", "evidence")
        if uses_shadow and self._shadow_base is None:
            # The fixed shadow base is the first global adapter the strategy sees.
            self._shadow_base = {k: np.array(v, dtype=np.float32, copy=True) for k, v in self._global.items()}
            assert self._round is not None
            state = self._round.detector_json()
            self._build_round()
            self._round.load_detector_json(state)
        config["safe-fedllm.level"] = self.level
        config["safe-fedllm.feature-keys"] = ",".join(self.probe.feature_keys)
        config["safe-fedllm.step-trail"] = self.level == "step"
        config["safe-fedllm.shadow"] = uses_shadow
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not uses_shadow or self._shadow_base is None:
            return messages
        # Per node: a client the evidence level has frozen trains no shadow
        # branch (the reference's `use_shadow`), except in its audit rounds.
        assert self._round is not None
        base = numpy_to_array_record(self._shadow_base)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            needs = self._round.needs_shadow(str(node))
            node_config = ConfigRecord(dict(config))
            node_config["safe-fedllm.shadow"] = needs
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            if needs:
                content[SHADOW_BASE_KEY] = base
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Runs the defended round on the replies; ``None`` arrays = skipped round."""
        started = time.perf_counter()
        valid, _errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        if self._global is None or self._round is None:
            raise RuntimeError("aggregate_train called before configure_train")
        reports, excluded = self._admit(valid)
        metrics: dict[str, Any] = {"safe-fedllm.admitted": len(reports), "safe-fedllm.excluded": len(excluded)}
        outcome: dict[str, Any] | None = None
        new_arrays: ArrayRecord | None = None
        round_error: str | None = None
        if reports:
            try:
                outcome = self._round.run(server_round - 1, self._global, reports)
            except SafeFedLLMError as e:
                # A round-level fault (e.g. too few clients left for Krum's
                # n >= 2f + 3) keeps the global model rather than failing the
                # ServerApp; the reason goes to the audit log.
                round_error = f"{type(e).__name__}: {e}"
                log(WARNING, "safe-fedllm round %d: %s; global kept", server_round, round_error)
            else:
                new_global = outcome.pop("new_global")
                if new_global is not None:
                    new_arrays = self._to_record(new_global)
        for node, reason in excluded.items():
            metrics[f"factor.{node}"] = 0.0
            metrics[f"verdict.{node}"] = -1
            metrics[f"excluded.{node}"] = 1
        if outcome is not None:
            for c in outcome["clients"]:
                node = c["client"]
                metrics[f"factor.{node}"] = float(c["factor"])
                metrics[f"verdict.{node}"] = _VERDICT_CODE.get(c["verdict"], -1)
                metrics[f"excluded.{node}"] = int(c["aggregation_weight"] is None)
            metrics["safe-fedllm.mean-factor"] = float(outcome["mean_factor"])
            metrics["safe-fedllm.skipped"] = int(outcome["skipped"])
        else:
            metrics["safe-fedllm.skipped"] = 1
        seconds = time.perf_counter() - started
        metrics["safe-fedllm.seconds"] = seconds
        self._audit(server_round, outcome, excluded, seconds, round_error)
        self._checkpoint(server_round)
        self.last_outcome = {"server_round": server_round, "outcome": outcome, "admission": excluded}
        skipped = new_arrays is None
        log(INFO if not skipped else WARNING, "safe-fedllm round %d: %s; factors %s",
            server_round, "skipped (global kept)" if skipped else "aggregated",
            {k[7:]: round(v, 4) for k, v in metrics.items() if k.startswith("factor.")})
        return new_arrays, MetricRecord(metrics)

    # -- helpers ----------------------------------------------------------

    def _to_record(self, new_global: dict[str, np.ndarray]) -> ArrayRecord:
        """The new global under the global record's own key names and order."""
        assert self._global_record is not None
        out = {}
        for name in self._global_record.keys():
            canonical = _native.canonical_key(name)
            out[name] = Array(new_global[canonical if canonical is not None else name])
        return ArrayRecord(out)

    def _admit(self, replies: list[Message]) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Admission: one reason per excluded node; reports for the others."""
        assert self._global is not None
        reports: list[dict[str, Any]] = []
        excluded: dict[str, str] = {}
        seen: set[str] = set()
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            if node in seen:
                excluded[node] = "more than one reply from this node"
                reports = [r for r in reports if r["client"] != node]
                continue
            seen.add(node)
            try:
                report = self._admit_one(node, msg)
            except (SafeFedLLMError, ValueError, TypeError, KeyError) as e:
                excluded[node] = f"{type(e).__name__}: {e}"
                continue
            reports.append(report)
        return reports, excluded

    def _admit_one(self, node: str, msg: Message) -> dict[str, Any]:
        assert self._global is not None
        content = msg.content
        records = content.array_records
        if self.arrayrecord_key in records:
            update_record = records[self.arrayrecord_key]
        else:
            main = [k for k in records if not k.startswith("safe-fedllm.")]
            if len(main) != 1:
                raise ValueError(f"expected one update ArrayRecord, found {sorted(records)}")
            update_record = records[main[0]]
        update = array_record_to_numpy(update_record)
        for key, value in update.items():
            if _native.canonical_key(key) is None:
                raise KeyError(f"{key!r} is not a LoRA A/B tensor name")
            if value.dtype != np.float32:
                raise TypeError(f"tensor {key!r} has dtype {value.dtype}, expected float32")
            if value.ndim != 2:
                raise ValueError(f"tensor {key!r} has shape {value.shape}, expected a matrix")
        raw = None
        for rec in content.metric_records.values():
            if self.weighted_by_key in rec:
                raw = rec[self.weighted_by_key]
                break
        samples = self.admission.declared_samples(raw)
        report: dict[str, Any] = {"client": node, "update": update, "samples": samples}
        report["steps"] = self._evidence(content, STEPS_KEY, STEP_SCORES_KEY, fill=update)
        report["shadow"] = self._evidence(content, SHADOW_KEY, SHADOW_SCORES_KEY, fill=self._shadow_base)
        return report

    def _evidence(self, content: Any, arrays_key: str, scores_key: str, fill: dict[str, np.ndarray] | None) -> Any:
        """A branch's step evidence: trail arrays (verifiable) or scores (self-reported).

        A trail carries only the probe's feature tensors; the other tensors
        are filled from ``fill`` (the update for the main branch, the shadow
        base for the shadow branch): they do not enter the probe's features,
        and the trail check then compares exactly the tensors the client sent.
        """
        trail = _split_trail(content.array_records.get(arrays_key))
        if trail is not None:
            if fill is None:
                raise ValueError(f"{arrays_key} sent but there is no base to complete it against")
            return [{**fill, **step} for step in trail]
        for rec in content.metric_records.values():
            if scores_key in rec:
                scores = rec[scores_key]
                scores = scores if isinstance(scores, list) else [scores]
                return [float(s) for s in scores]
        return None

    def _audit(
        self, server_round: int, outcome: dict[str, Any] | None, excluded: dict[str, str], seconds: float,
        round_error: str | None,
    ) -> None:
        if self.audit_path is None:
            return
        line = {
            "server_round": server_round,
            "round_error": round_error,
            "admission_exclusions": excluded,
            "seconds": seconds,
            "outcome": None if outcome is None else json.loads(outcome["audit_line"]),
        }
        with open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
