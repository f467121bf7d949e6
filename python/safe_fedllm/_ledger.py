"""One round's account of every reply: admitted, rejected (why), failed, dropped.

The round's metrics and its audit line are both computed from the same
ledger, so their totals agree by construction; the ledger itself is read off
the native round's outcome (one entry per client, whatever stage refused it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import MetricRecord, RecordDict

#: Refusal codes the strategy gives replies it could not hand over as updates.
FAILED = "failed"
DROPPED = "dropped"

#: ``status.<node>`` metric codes.
STATUS_CODE = {"admitted": 0, "rejected": 1, "failed": 2, "dropped": 3, "unassessed": 4}
_VERDICT_CODE = {"benign": 0, "malicious": 1, "undecided": -1}
#: Metric names the strategy owns; a client metric with one of these is dropped.
RESERVED_PREFIXES = ("safe-fedllm.", "factor.", "verdict.", "excluded.", "status.")


@dataclass
class Entry:
    """One node's line in the round's ledger."""

    node: int
    client: str
    status: str
    reason: Any = None
    factor: float = 0.0
    verdict: int = -1
    aggregated: bool = False
    samples: int = 0


@dataclass
class Intake:
    """What the strategy hands the native round, and what it knows per node."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, tuple[str, str]] = field(default_factory=dict)
    contents: dict[str, RecordDict] = field(default_factory=dict)
    sampled: int = 0
    replied: int = 0

    def refuse(self, client: str, node: int, code: str, detail: str) -> None:
        """Adds a report the native admission will reject with this reason."""
        self.nodes[client] = node
        self.refusals[client] = (code, detail)
        self.reports.append({"client": client, "refused": (code, detail)})

    def admit(self, client: str, node: int, report: dict[str, Any], content: RecordDict) -> None:
        """Adds a readable report (the native admission still decides on it)."""
        self.nodes[client] = node
        self.contents[client] = content
        self.reports.append(report)


def ledger(intake: Intake, outcome: dict[str, Any] | None) -> list[Entry]:
    """Every node of the round, from the native outcome (or the intake when the round raised)."""
    entries: list[Entry] = []
    if outcome is None:
        for report in intake.reports:
            client = report["client"]
            code, detail = intake.refusals.get(client, ("", ""))
            status = code if code in (FAILED, DROPPED) else ("rejected" if code else "unassessed")
            entries.append(Entry(intake.nodes[client], client, status, detail or None))
        return entries
    for c in outcome["clients"]:
        client = c["client"]
        code, detail = intake.refusals.get(client, ("", ""))
        admission = c["admission"]
        if code in (FAILED, DROPPED):
            status, reason = code, detail
        elif c["disposition"] == "assessed":
            status, reason = "admitted", None
        else:
            status = "rejected"
            reason = admission if admission.get("status") == "rejected" else {"disposition": c["disposition"], "detail": c["detail"]}
        entries.append(Entry(
            node=intake.nodes.get(client, -1), client=client, status=status, reason=reason,
            factor=float(c["factor"]), verdict=_VERDICT_CODE.get(c["verdict"], -1),
            aggregated=c["aggregation_weight"] is not None, samples=int(c["samples"]),
        ))
    return entries


def totals(entries: list[Entry], intake: Intake) -> dict[str, int]:
    """Round totals; ``admitted + rejected + failed + dropped + unassessed`` is every entry."""
    out = {f"safe-fedllm.{s}": 0 for s in STATUS_CODE}
    for e in entries:
        out[f"safe-fedllm.{e.status}"] += 1
    aggregated = sum(e.aggregated for e in entries)
    out["safe-fedllm.sampled"] = intake.sampled
    out["safe-fedllm.replied"] = intake.replied
    out["safe-fedllm.aggregated"] = aggregated
    out["safe-fedllm.excluded"] = len(entries) - aggregated
    return out


def per_node_metrics(entries: list[Entry]) -> dict[str, Any]:
    """``factor.<node>``, ``verdict.<node>``, ``excluded.<node>``, ``status.<node>``."""
    out: dict[str, Any] = {}
    for e in entries:
        out[f"factor.{e.node}"] = e.factor
        out[f"verdict.{e.node}"] = e.verdict
        out[f"excluded.{e.node}"] = int(not e.aggregated)
        out[f"status.{e.node}"] = STATUS_CODE[e.status]
    return out


def client_metrics(
    aggregate: Callable[[list[RecordDict], str], MetricRecord],
    weighted_by_key: str,
    intake: Intake,
    entries: list[Entry],
) -> tuple[dict[str, Any], str | None]:
    """The clients' own train metrics through Flower's ``train_metrics_aggr_fn``.

    The function is called as FedAvg calls it, ``fn(list[RecordDict],
    weighted_by_key)``, on one RecordDict per *admitted* reply holding that
    reply's MetricRecord. Two differences, both because the client controls
    its reply: rejected, failed and dropped replies are left out, and the
    weight key holds the count the admission policy let the client aggregate
    with (a declared ``num-examples`` of 10¹² does not make its train loss the
    round's). Returns the metrics and, if the function raised (for example on
    replies whose metric keys differ), the error text instead.
    """
    records: list[RecordDict] = []
    for e in entries:
        content = intake.contents.get(e.client)
        if e.status != "admitted" or content is None:
            continue
        metrics = next((r for r in content.metric_records.values() if weighted_by_key in r), None)
        if metrics is None:
            continue
        kept = {k: v for k, v in metrics.items() if not k.startswith(RESERVED_PREFIXES)}
        kept[weighted_by_key] = e.samples
        records.append(RecordDict({"metrics": MetricRecord(kept)}))
    if not records:
        return {}, None
    try:
        out = aggregate(records, weighted_by_key)
    except Exception as e:  # the user's function, on client-controlled values
        return {}, f"{type(e).__name__}: {e}"
    if out is None:
        return {}, None
    return {k: v for k, v in out.items() if not k.startswith(RESERVED_PREFIXES)}, None


def reply_table(entries: list[Entry]) -> dict[str, dict[str, Any]]:
    """The audit's ``replies`` field: per node, the client id, status and reason."""
    return {
        str(e.node): {"client": e.client, "status": e.status, "reason": e.reason, "aggregated": e.aggregated}
        for e in entries
    }
