"""A Flower (≥ 1.42, Message API) strategy that runs Safe-FedLLM's defended round.

:class:`SafeFedLLMStrategy` subclasses :class:`flwr.serverapp.strategy.FedAvg`
and overrides ``configure_train`` (to keep the global arrays and the sampled
nodes), ``aggregate_train`` (to run the defence) and ``start`` (to resume).
Sampling, evaluation and the round loop are Flower's own.

The defence is a defense spec (:class:`safe_fedllm.DefendedRound.from_spec`),
the same TOML the Rust library and the command-line tool read. In a
ServerApp, take it from Flower's ``run_config`` (see :mod:`safe_fedllm._spec`
for the keys: ``safe-fedllm.spec-file`` and ``safe-fedllm.spec.<section>.<key>``):

>>> from safe_fedllm.flower import SafeFedLLMStrategy
>>> strategy = SafeFedLLMStrategy.from_run_config(
...     context.run_config, audit_path="audit.jsonl", state_path="state.npz",
...     fraction_evaluate=0.0, min_available_nodes=4)
>>> result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

or give it directly: ``SafeFedLLMStrategy(spec="defense.toml")`` or
``SafeFedLLMStrategy(probe, spec={"detector": {"level": "step"}})``.

Per round it

1. accounts for every node it sampled: a result, a failed reply (Flower
   error, "Node Unavailable"), or no reply at all (dropped). All of them go
   to the native :class:`safe_fedllm.DefendedRound`; failed, dropped and
   undecodable replies as refused reports, which its admission stage rejects
   with the reason. One code path decides, and every rejection counts 0 in
   the safety gate's mean factor;
2. runs the defended round: admission (keys, shapes, finiteness, probe keys,
   norm bound, sample cap), the probe's score, the detector level's factor,
   the safety gate, the aggregation rule;
3. returns the new global ``ArrayRecord`` (``None`` for a skipped round:
   Flower keeps the model) and one ``MetricRecord``: the clients' own train
   metrics aggregated with ``train_metrics_aggr_fn`` over the admitted
   replies, per node ``factor.<node>``, ``verdict.<node>`` (1 malicious, 0
   benign, −1 undecided), ``excluded.<node>`` (1 when it is not in the
   aggregate) and ``status.<node>`` (0 admitted, 1 rejected, 2 failed, 3
   dropped, 4 unassessed), and the totals ``safe-fedllm.sampled``,
   ``.replied``, ``.admitted``, ``.rejected``, ``.failed``, ``.dropped``,
   ``.unassessed``, ``.aggregated``, ``.excluded``, ``.mean-factor``,
   ``.skipped``;
4. saves the state file (global arrays, completed rounds, detector state,
   shadow base, the audit line) atomically, then appends the same audit
   line (with ``replies``: per node the client id, status and reason, and
   the same totals) to ``audit_path``.

Resume: a strategy built with the ``state_path`` of a previous run loads it;
``start`` then continues from the saved global at the saved round
(``num_rounds`` is the total: a run stopped after round 2 of 5 runs rounds
3–5), round numbers in the audit, the metrics and ``Result`` keep
increasing, and the detector keeps its per-client memory.

Identities: the detector's memory is keyed by a client id. With
``identity="auto"`` (default) it is the SuperNode's public key (hashed,
``pk:<hex>``) as Flower's SuperLink reports it (``grid.get_nodes()``), else
the node id. A SuperNode started with ``--auth-supernode-private-key`` keeps
its key, hence its identity, across its own restarts and reconnects, and
across SuperLink restarts once its key is registered again (it may get a new
node id; metrics keep using node ids, the audit maps them). Without a key
file a SuperNode generates a new key on every start: its history then starts
over, and nothing stops a client from doing that on purpose unless the
SuperLink runs with ``--enable-supernode-auth`` (only keys the operator
registered may connect). See ``python/README.md``.

What the server verifies and what is self-reported: the update itself is the
evidence for the client level (its last step): verified. A step trail sent as
arrays is scored by the server and its last step is checked against the update
(verified consistency; intermediate steps are still the client's word). A
shadow branch is trained on the client's data: self-reported. Scores sent as
numbers (``safe-fedllm.step-scores``) are self-reported. The audit records
which kind each client sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import _ledger, _native
from ._records import array_record_to_numpy, numpy_to_array_record, split_trail
from ._spec import SPEC_FILE_KEY, SPEC_KEY_PREFIX, AdmissionPolicy, keyword_spec, spec_from_run_config
from .errors import CheckpointError, SafeFedLLMError
from .state import StrategyState, append_audit_line, complete_audit_log

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg, Result
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("safe_fedllm.flower needs Flower: pip install 'flwr>=1.42'") from exc

__all__ = [
    "AdmissionPolicy",
    "SafeFedLLMStrategy",
    "STEPS_KEY",
    "SHADOW_KEY",
    "SHADOW_BASE_KEY",
    "STEP_SCORES_KEY",
    "SPEC_FILE_KEY",
    "SPEC_KEY_PREFIX",
    "spec_from_run_config",
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


def _identity_of(node: Any) -> str | None:
    """``pk:<sha256 prefix>`` of a NodeInfo's public key, or None without one."""
    key = getattr(node, "public_key", b"") or b""
    return "pk:" + hashlib.sha256(bytes(key)).hexdigest()[:24] if key else None


class SafeFedLLMStrategy(FedAvg):
    """FedAvg with the Safe-FedLLM defence in ``aggregate_train``.

    Parameters
    ----------
    probe:
        A trained :class:`safe_fedllm.Probe` (or the path of a saved one),
        for a spec that names none; ``None`` when the spec's ``probe``
        section names it.
    spec:
        The defense spec: a dict or the path of a ``.toml`` / ``.json``
        file (:meth:`safe_fedllm.DefendedRound.from_spec`); ``None``: the
        safe defaults. Detector level (``"client"``: needs nothing from
        clients but their update; ``"step"``: a step trail; ``"shadow"`` /
        ``"evidence"``: a shadow branch), rule, safety gate (every sampled
        node counted in its mean; rejected, failed and dropped ones as 0),
        trail check and admission policy are all in it. A misspelt key raises
        :class:`safe_fedllm.SpecError` naming it.
    base_dir:
        The folder a dict spec's relative probe path is read against.
    audit_path:
        JSON-lines file, one line per round (appended, fsynced).
    state_path:
        The strategy's state file (:mod:`safe_fedllm.state`), replaced
        atomically after each round and loaded at construction when it
        exists. ``checkpoint_path`` is accepted as another name for it.
    identity:
        ``"auto"`` (the SuperNode's public key when the SuperLink reports one,
        else its node id) or ``"node_id"``.
    level, detector_settings, rule, rule_settings, skip_avg_weight, trail, admission:
        Deprecated (``DeprecationWarning``): the keyword form, turned into
        the spec it describes. Write ``spec=`` instead.
    **fedavg_kwargs:
        Passed to :class:`flwr.serverapp.strategy.FedAvg`
        (``train_metrics_aggr_fn`` included: see ``aggregate_train``).
    """

    def __init__(
        self,
        probe: _native.Probe | str | os.PathLike[str] | None = None,
        *,
        spec: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        audit_path: str | os.PathLike[str] | None = None,
        state_path: str | os.PathLike[str] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        identity: str = "auto",
        level: str | None = None,
        detector_settings: dict[str, Any] | None = None,
        rule: str | None = None,
        rule_settings: dict[str, Any] | None = None,
        skip_avg_weight: float | None = None,
        trail: str | float | None = None,
        admission: AdmissionPolicy | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if identity not in ("auto", "node_id"):
            raise ValueError(f"identity {identity!r} is not 'auto' or 'node_id'")
        legacy = keyword_spec(level, detector_settings, rule, rule_settings, skip_avg_weight, trail, admission)
        if legacy:
            if spec is not None:
                raise TypeError("give the defence as spec=..., not also as keywords (level=, rule=, …)")
            warnings.warn(
                "SafeFedLLMStrategy(level=..., rule=..., skip_avg_weight=..., admission=...) is deprecated: "
                f"pass the defense spec instead, spec={legacy!r} (or a spec file, or from_run_config)",
                DeprecationWarning, stacklevel=2)
            spec = legacy
        self._spec: dict[str, Any] | str = (
            {} if spec is None else os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else dict(spec))
        self._base_dir = os.fspath(base_dir) if base_dir is not None else None
        self._probe = probe if probe is None or isinstance(probe, _native.Probe) else _native.Probe.load(os.fspath(probe))
        self.identity = identity
        self.audit_path = os.fspath(audit_path) if audit_path is not None else None
        path = state_path if state_path is not None else checkpoint_path
        self.state_path = os.fspath(path) if path is not None else None
        self._global: dict[str, np.ndarray] | None = None
        self._global_record: ArrayRecord | None = None
        self._shadow_base: dict[str, np.ndarray] | None = None
        self._round: _native.DefendedRound | None = None
        # Per round: the messages configure_train returned (Flower sets their
        # message ids when it pushes them) and the node -> client id map.
        self._sent: list[Message] = []
        self._clients: dict[int, str] = {}
        self._identities: dict[str, str] = {}
        self._completed = 0
        self._offset = 0
        self._resumed_global: dict[str, np.ndarray] | None = None
        self.last_outcome: dict[str, Any] | None = None
        self._build_round()
        assert self._round is not None
        #: The checked spec (canonical form) and its SHA-256, recorded in every audit line.
        self.spec: dict[str, Any] = self._round.spec
        self.spec_sha256: str = self._round.spec_sha256
        #: The probe the round scores with (the spec's τ applied).
        self.probe: _native.Probe = self._round.probe
        #: The detector level the spec names.
        self.level: str = self._round.level
        log(INFO, "safe-fedllm: defense spec %s", json.dumps({"spec": self.spec, "spec_sha256": self.spec_sha256}))
        self._resume()

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> "SafeFedLLMStrategy":
        """The strategy a Flower ``run_config`` configures.

        The spec is the file named by ``safe-fedllm.spec-file`` (relative to
        ``base_dir``, default the working directory; empty: the safe defaults)
        with every ``safe-fedllm.spec.<section>.<key>`` setting merged in,
        e.g. in the app's ``pyproject.toml``::

            [tool.flwr.app.config]
            "safe-fedllm.spec-file" = "/etc/fl/defense.toml"
            "safe-fedllm.spec.detector.level" = "client"
            "safe-fedllm.spec.gate.threshold" = 0.3

        and per run ``flwr run . --run-config 'safe-fedllm.spec.detector.level="evidence"'``.
        Flower fuses the declared defaults with the run's overrides, so a
        declared setting always wins over the file's. An unknown
        ``safe-fedllm.*`` key or a setting the spec refuses raises
        :class:`safe_fedllm.SpecError` naming the run_config key. ``kwargs``
        are the constructor's others (``probe`` for a spec naming none,
        ``audit_path``, ``state_path``, FedAvg's).
        """
        for key in ("spec", "level", "detector_settings", "rule", "rule_settings", "skip_avg_weight", "trail",
                    "admission"):
            if key in kwargs:
                raise TypeError(f"from_run_config takes the defence from the run_config, not from {key}=")
        spec, spec_dir = spec_from_run_config(run_config, base_dir=base_dir)
        return cls(spec=spec, base_dir=spec_dir, **kwargs)

    # -- set-up -----------------------------------------------------------

    def _build_round(self) -> None:
        self._round = _native.DefendedRound.from_spec(
            self._spec, probe=self._probe, base_dir=self._base_dir, shadow_base=self._shadow_base)

    def _resume(self) -> None:
        """Loads the state file of a previous run, and completes its audit log."""
        if self.state_path is None or not os.path.exists(self.state_path):
            return
        state = StrategyState.load(self.state_path)
        if state.level != self.level:
            raise CheckpointError(
                f"state file {self.state_path} is {state.level}-level, this strategy runs {self.level}-level",
                kind="checkpoint", expected=self.level, found=state.level, path=self.state_path,
            )
        if state.shadow_base is not None:
            self._shadow_base = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.shadow_base.items()}
            self._build_round()
        assert self._round is not None
        self._round.load_detector_json(json.dumps(state.detector))
        self._completed = state.completed_rounds
        self._resumed_global = state.global_arrays or None
        self._identities = dict(state.identities)
        if self.audit_path is not None:
            complete_audit_log(self.audit_path, state)
        log(INFO, "safe-fedllm: resumed after round %d from %s", self._completed, self.state_path)

    @property
    def completed_rounds(self) -> int:
        """Rounds completed so far, over every run that shared the state file."""
        return self._completed

    def summary(self) -> None:
        """Logs Flower's summary and the defence settings."""
        super().summary()
        log(INFO, "\t└──> Safe-FedLLM: level=%s identity=%s spec_sha256=%s spec=%s",
            self.level, self.identity, self.spec_sha256, json.dumps(self.spec))

    # -- the round loop -----------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's loop, resumed: ``num_rounds`` is the total over restarts.

        After a restart the saved global replaces ``initial_arrays`` (whose
        tensor names must match it) and only the remaining rounds run; round
        numbers passed to hooks, ``evaluate_fn`` and ``Result`` are absolute.
        """
        done = self._completed
        arrays = initial_arrays
        if self._resumed_global is not None:
            names = list(initial_arrays.keys())
            if sorted(names) != sorted(self._resumed_global):
                raise CheckpointError(
                    f"state file {self.state_path} holds a global with tensors {sorted(self._resumed_global)[:3]}…, "
                    f"the ServerApp's initial arrays have {sorted(names)[:3]}…: not the same model",
                    kind="checkpoint", path=self.state_path,
                )
            arrays = numpy_to_array_record(self._resumed_global)
            log(INFO, "safe-fedllm: continuing from the saved global after round %d (initial arrays ignored)", done)
        if done >= num_rounds:
            log(WARNING, "safe-fedllm: %d of %d rounds already done; nothing to run", done, num_rounds)
            result = Result()
            result.arrays = arrays
            return result
        self._offset = done
        shifted_eval = None if evaluate_fn is None else (lambda r, a: evaluate_fn(r + done, a))
        try:
            result = super().start(grid, arrays, num_rounds - done, timeout, train_config, evaluate_config, shifted_eval)
        finally:
            self._offset = 0
        for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
            table = getattr(result, name)
            setattr(result, name, {r + done: v for r, v in table.items()})
        if len(result.arrays) == 0 and self._global_record is not None:
            result.arrays = self._global_record  # every round skipped: the global kept
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keeps the global arrays and the sampled nodes, tells clients what evidence to send."""
        server_round += self._offset
        self._global_record = arrays
        self._global = array_record_to_numpy(arrays)
        self._clients = self._client_ids(grid)
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
        if uses_shadow and self._shadow_base is not None:
            messages = self._with_shadow_base(messages, arrays, config)
        self._sent = messages
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, with the absolute round number."""
        return super().configure_evaluate(server_round + self._offset, arrays, config, grid)

    def _client_ids(self, grid: Grid) -> dict[int, str]:
        """node id -> the id the detector keys its memory on."""
        if self.identity == "node_id" or not hasattr(grid, "get_nodes"):
            return {}
        try:
            nodes = list(grid.get_nodes())
        except Exception as e:  # a Grid without node info: node ids it is
            log(WARNING, "safe-fedllm: grid.get_nodes() failed (%s); identifying clients by node id", e)
            return {}
        out = {}
        for info in nodes:
            ident = _identity_of(info)
            if ident is not None:
                out[int(info.node_id)] = ident
        return out

    def _client(self, node: int) -> str:
        client = self._clients.get(node, str(node))
        self._identities[str(node)] = client
        return client

    def _with_shadow_base(self, messages: list[Message], arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """Per node: a client the evidence level has frozen trains no shadow
        branch (the reference's ``use_shadow``), except in its audit rounds."""
        assert self._round is not None and self._shadow_base is not None
        base = numpy_to_array_record(self._shadow_base)
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            needs = self._round.needs_shadow(self._client(node))
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
        """Runs the defended round on every sampled node; ``None`` arrays = skipped round.

        The clients' own metrics are aggregated with ``train_metrics_aggr_fn``
        (FedAvg's call, ``fn(list[RecordDict], weighted_by_key)``) over the
        admitted replies, weighted by their admitted sample counts; the
        strategy's own keys win over a client metric of the same name.
        """
        started = time.perf_counter()
        server_round += self._offset
        replies = list(replies)
        self._check_and_log_replies(replies, is_train=True, validate=False)
        if self._global is None or self._round is None:
            raise RuntimeError("aggregate_train called before configure_train")
        intake = self._intake(replies)
        outcome: dict[str, Any] | None = None
        new_global: dict[str, np.ndarray] | None = None
        round_error: str | None = None
        if intake.reports:
            try:
                outcome = self._round.run(server_round - 1, self._global, intake.reports)
            except SafeFedLLMError as e:
                # A round-level fault (e.g. too few clients left for Krum's
                # n >= 2f + 3) keeps the global model rather than failing the
                # ServerApp; the reason goes to the audit log.
                round_error = f"{type(e).__name__}: {e}"
                log(WARNING, "safe-fedllm round %d: %s; global kept", server_round, round_error)
            else:
                new_global = outcome.pop("new_global")
        entries = _ledger.ledger(intake, outcome)
        totals = _ledger.totals(entries, intake)
        totals["safe-fedllm.skipped"] = int(new_global is None)
        own: dict[str, Any] = {**totals, **_ledger.per_node_metrics(entries)}
        if outcome is not None:
            own["safe-fedllm.mean-factor"] = float(outcome["mean_factor"])
        client_metrics, metrics_error = _ledger.client_metrics(
            self.train_metrics_aggr_fn, self.weighted_by_key, intake, entries)
        seconds = time.perf_counter() - started
        own["safe-fedllm.seconds"] = seconds
        new_arrays = None if new_global is None else self._to_record(new_global)
        line = {
            "server_round": server_round,
            "round_error": round_error,
            "totals": totals,
            "replies": _ledger.reply_table(entries),
            "client_metrics": client_metrics,
            "client_metrics_error": metrics_error,
            "seconds": seconds,
            "outcome": None if outcome is None else json.loads(outcome["audit_line"]),
        }
        self._completed = server_round
        self._save_state(new_arrays, line)
        if self.audit_path is not None:
            append_audit_line(self.audit_path, line)
        self.last_outcome = {"server_round": server_round, "outcome": outcome, "replies": line["replies"]}
        log(INFO if new_arrays is not None else WARNING, "safe-fedllm round %d: %s; %s", server_round,
            "aggregated" if new_arrays is not None else "skipped (global kept)",
            {k[12:]: v for k, v in totals.items()})
        return new_arrays, MetricRecord({**client_metrics, **own})

    # -- helpers ----------------------------------------------------------

    def _save_state(self, new_arrays: ArrayRecord | None, line: dict[str, Any]) -> None:
        if self.state_path is None or self._round is None:
            return
        record = new_arrays if new_arrays is not None else self._global_record
        assert record is not None
        StrategyState(
            completed_rounds=self._completed,
            level=self.level,
            detector=json.loads(self._round.detector_json()),
            global_arrays={k: np.asarray(v) for k, v in array_record_to_numpy(record).items()},
            shadow_base=self._shadow_base,
            last_audit_line=line,
            identities=self._identities,
        ).save(self.state_path)

    def _to_record(self, new_global: dict[str, np.ndarray]) -> ArrayRecord:
        """The new global under the global record's own key names and order."""
        assert self._global_record is not None
        out = {}
        for name in self._global_record.keys():
            canonical = _native.canonical_key(name)
            out[name] = Array(new_global[canonical if canonical is not None else name])
        return ArrayRecord(out)

    @staticmethod
    def _sender(msg: Message, instructions: dict[str, int]) -> int:
        """The node a reply answers for: the destination of the instruction it
        replies to (Flower's own "Node Unavailable" replies come from the
        SuperLink), else its source node."""
        node = instructions.get(msg.metadata.reply_to_message_id)
        return node if node is not None else int(msg.metadata.src_node_id)

    def _intake(self, replies: list[Message]) -> _ledger.Intake:
        """One report per node: sampled nodes without a reply are dropped,
        error replies failed, undecodable replies refused; the native
        admission decides all of them."""
        sampled = [int(m.metadata.dst_node_id) for m in self._sent]
        intake = _ledger.Intake(sampled=len(sampled), replied=sum(not m.has_error() for m in replies))
        # Flower sets each instruction's message id when it pushes it.
        instructions = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent if m.metadata.message_id}
        by_node: dict[int, list[Message]] = {}
        for msg in replies:
            by_node.setdefault(self._sender(msg, instructions), []).append(msg)
        for node, msgs in by_node.items():
            client = self._client(node)
            msg = msgs[0]
            if len(msgs) > 1:
                intake.refuse(client, node, "duplicate_reply", f"{len(msgs)} replies from this node in one round")
            elif sampled and node not in sampled:
                intake.refuse(client, node, "not_sampled", "this node was not sampled this round")
            elif msg.has_error():
                intake.refuse(client, node, _ledger.FAILED,
                              f"Flower error code {msg.error.code}: {msg.error.reason}")
            else:
                try:
                    intake.admit(client, node, self._report(client, msg), msg.content)
                except (SafeFedLLMError, ValueError, TypeError, KeyError) as e:
                    intake.refuse(client, node, type(e).__name__, str(e))
        for node in sampled:
            if node not in by_node:
                intake.refuse(self._client(node), node, _ledger.DROPPED,
                              "sampled in configure_train; no reply when the round closed")
        return intake

    def _report(self, client: str, msg: Message) -> dict[str, Any]:
        """The native round's report of a reply. Only decoding happens here;
        dtype, rank, key names and every value check are the native round's."""
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
        raw = None
        for rec in content.metric_records.values():
            if self.weighted_by_key in rec:
                raw = rec[self.weighted_by_key]
                break
        samples = AdmissionPolicy.declared_samples(raw)
        report: dict[str, Any] = {"client": client, "update": update, "samples": samples}
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
        trail = split_trail(content.array_records.get(arrays_key))
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
