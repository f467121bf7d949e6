"""Every reply of a round accounted for: metrics totals equal the audit's, failed
replies and dropped nodes are audit entries that count 0 in the safety gate,
and the clients' own train metrics go through ``train_metrics_aggr_fn``."""

from __future__ import annotations

import json

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords  # noqa: E402

from safe_fedllm.flower import array_record_to_numpy  # noqa: E402
from conftest import KEY, client_update  # noqa: E402
from test_strategy import _run_identity, configured, make, reply  # noqa: E402,F401

QB0 = KEY.format(layer=0, module="q", factor="B")


def last_audit(tmp_path):
    return json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])


def totals_from_audit(audit):
    """The totals an auditor computes from the native outcome and the reply table alone."""
    statuses = [r["status"] for r in audit["replies"].values()]
    clients = audit["outcome"]["clients"]
    aggregated = sum(c["aggregation_weight"] is not None for c in clients)
    return {
        "admitted": sum(c["disposition"] == "assessed" for c in clients),
        "rejected": statuses.count("rejected"),
        "failed": statuses.count("failed"),
        "dropped": statuses.count("dropped"),
        "aggregated": aggregated,
        "excluded": len(clients) - aggregated,
        "entries": len(clients),
    }


def test_metrics_totals_equal_the_audits_with_rejected_failed_and_dropped(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path)
    nodes = list(range(1, 13))
    configured(s, global_arrays, nodes=nodes)
    benign = [client_update(global_arrays, rng, False) for _ in range(5)]
    f64 = {k: v.astype(np.float64) for k, v in client_update(global_arrays, rng, False).items()}
    nan = client_update(global_arrays, rng, False)
    nan[QB0] = nan[QB0].copy()
    nan[QB0][1, 1] = np.nan
    replies = [reply(1 + i, u) for i, u in enumerate(benign)]          # 1..5 admitted
    replies += [reply(6, f64), reply(7, nan), reply(8, benign[0], num_examples=-1),
                reply(9, client_update(global_arrays, rng, True))]     # 6..8 rejected, 9 malicious
    replies += [reply(10, None, error=True)]                            # 10 failed; 11, 12 dropped
    arrays, metrics = s.aggregate_train(1, replies)
    audit = last_audit(tmp_path)
    want = totals_from_audit(audit)
    assert want["entries"] == len(nodes)  # every sampled node has an entry
    for name in ("admitted", "rejected", "failed", "dropped", "aggregated", "excluded"):
        assert metrics[f"safe-fedllm.{name}"] == want[name] == audit["totals"][f"safe-fedllm.{name}"], name
    assert (want["admitted"], want["rejected"], want["failed"], want["dropped"]) == (6, 3, 1, 2)
    assert metrics["safe-fedllm.sampled"] == 12 and metrics["safe-fedllm.replied"] == 9
    # per-node flags agree with the totals
    assert sum(metrics[f"excluded.{n}"] for n in nodes) == metrics["safe-fedllm.excluded"]
    assert metrics["safe-fedllm.excluded"] >= 6 and metrics["factor.9"] < 0.05  # 3 rejected, failed, 2 dropped
    assert audit["replies"]["10"]["status"] == "failed" and "boom" in audit["replies"]["10"]["reason"]
    assert audit["replies"]["11"]["status"] == "dropped" and "no reply" in audit["replies"]["11"]["reason"]
    for n in (6, 7, 8):
        assert audit["replies"][str(n)]["reason"]["status"] == "rejected"
    # the gate's mean runs over all 12 entries: rejected, failed, dropped count 0
    factors = [c["factor"] for c in audit["outcome"]["clients"]]
    assert len(factors) == 12 and metrics["safe-fedllm.mean-factor"] == pytest.approx(sum(factors) / 12)
    assert arrays is not None
    new = array_record_to_numpy(arrays)
    mean = {k: np.mean([u[k] for u in benign], axis=0) for k in global_arrays}
    for k in global_arrays:
        assert np.abs(new[k] - mean[k]).max() < 5e-3


def test_python_side_refusals_count_zero_in_the_gate(probe, global_arrays, rng, tmp_path):
    """5 float64 clients beside 1 benign and 1 malicious: mean factor ≤ 1/7 < 0.2, skipped."""
    s = make(probe, tmp_path)
    configured(s, global_arrays, nodes=range(1, 8))
    f64 = [{k: v.astype(np.float64) for k, v in client_update(global_arrays, rng, False).items()} for _ in range(5)]
    replies = [reply(1 + i, u) for i, u in enumerate(f64)]
    replies += [reply(6, client_update(global_arrays, rng, False)), reply(7, client_update(global_arrays, rng, True))]
    arrays, metrics = s.aggregate_train(1, replies)
    # (factor of the benign + factor of the malicious) / 7, at most 2/7 — below 0.2 here
    assert metrics["safe-fedllm.mean-factor"] == pytest.approx((metrics["factor.6"] + metrics["factor.7"]) / 7)
    assert metrics["safe-fedllm.mean-factor"] < 0.2
    assert arrays is None and metrics["safe-fedllm.skipped"] == 1
    assert metrics["safe-fedllm.rejected"] == 5
    audit = last_audit(tmp_path)
    assert audit["outcome"]["skipped"] and audit["outcome"]["skip_reason"]


def test_dropped_nodes_alone_skip_the_round(probe, global_arrays, rng, tmp_path):
    """One benign reply of 8 sampled nodes: 7 dropped count 0, mean 1/8 < 0.2."""
    s = make(probe, tmp_path)
    configured(s, global_arrays, nodes=range(1, 9))
    arrays, metrics = s.aggregate_train(1, [reply(1, client_update(global_arrays, rng, False))])
    assert arrays is None and metrics["safe-fedllm.dropped"] == 7 and metrics["safe-fedllm.admitted"] == 1


def test_a_failed_reply_only(probe, global_arrays, tmp_path):
    s = make(probe, tmp_path)
    configured(s, global_arrays, nodes=[5, 6])
    arrays, metrics = s.aggregate_train(1, [reply(5, None, error=True)])
    assert arrays is None and metrics["safe-fedllm.failed"] == 1 and metrics["safe-fedllm.admitted"] == 0
    assert metrics["safe-fedllm.dropped"] == 1
    assert metrics["status.5"] == 2 and metrics["excluded.5"] == 1
    assert last_audit(tmp_path)["replies"]["5"]["status"] == "failed"


def test_reply_from_an_unsampled_node_is_rejected(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path)
    configured(s, global_arrays, nodes=[1, 2, 3])
    ups = [client_update(global_arrays, rng, False) for _ in range(4)]
    _, metrics = s.aggregate_train(1, [reply(n, u) for n, u in zip([1, 2, 3, 77], ups)])
    assert metrics["status.77"] == 1 and metrics["excluded.77"] == 1
    assert "not_sampled" in json.dumps(last_audit(tmp_path)["replies"]["77"]["reason"])


def test_client_train_metrics_use_train_metrics_aggr_fn_over_admitted_replies(probe, global_arrays, rng, tmp_path):
    calls = []

    def fn(records: list[RecordDict], key: str) -> MetricRecord:
        calls.append((len(records), key))
        return aggregate_metricrecords(records, key)

    s = make(probe, tmp_path, train_metrics_aggr_fn=fn, admission=None)
    configured(s, global_arrays, nodes=[1, 2, 3, 4])
    ups = [client_update(global_arrays, rng, False) for _ in range(3)]
    replies = [reply(1, ups[0], 100), reply(2, ups[1], 300), reply(3, ups[2], 10**12)]
    bad = {k: v.astype(np.float64) for k, v in ups[0].items()}
    replies.append(reply(4, bad, 100))
    for r, loss in zip(replies, [1.0, 2.0, 3.0, 1000.0]):
        r.content["metrics"]["train_loss"] = loss
        r.content["metrics"]["factor.1"] = 99.0  # a client cannot overwrite the strategy's keys
    _, metrics = s.aggregate_train(1, replies)
    assert calls == [(3, "num-examples")]  # the rejected float64 reply is left out
    # weights: the admitted counts (10**12 capped at the lower median count, 300)
    weights = np.array([100, 300, 300], float)
    assert metrics["train_loss"] == pytest.approx(float(weights @ [1.0, 2.0, 3.0] / weights.sum()))
    assert metrics["factor.1"] != 99.0
    assert last_audit(tmp_path)["client_metrics"]["train_loss"] == metrics["train_loss"]


def test_a_failing_train_metrics_aggr_fn_is_recorded_not_raised(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path)  # the default aggregate_metricrecords
    configured(s, global_arrays, nodes=[1, 2])
    r1, r2 = (reply(n, client_update(global_arrays, rng, False)) for n in (1, 2))
    r1.content["metrics"]["loss"] = [1.0, 2.0]
    r2.content["metrics"]["loss"] = [1.0, 2.0, 3.0]  # zip(strict=True) raises inside Flower's function
    arrays, metrics = s.aggregate_train(1, [r1, r2])
    assert arrays is not None and "loss" not in metrics
    assert "ValueError" in last_audit(tmp_path)["client_metrics_error"]
