"""The Flower strategy on constructed Flower Messages (no deployment)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402

import safe_fedllm as sf  # noqa: E402
from safe_fedllm.client import ShadowBranch, StepTrail, feature_keys_from_config, record_steps  # noqa: E402
from safe_fedllm.flower import (  # noqa: E402
    SHADOW_BASE_KEY,
    SHADOW_KEY,
    STEPS_KEY,
    AdmissionPolicy,
    SafeFedLLMStrategy,
    array_record_to_numpy,
    numpy_to_array_record,
)
from safe_fedllm.state import StrategyState  # noqa: E402
from conftest import KEY, client_update  # noqa: E402

QB0 = KEY.format(layer=0, module="q", factor="B")


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """configure_train builds Messages, which need a run id outside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


class FakeGrid:
    """Just enough of a Grid for FedAvg.configure_train's node sampling."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def reply(node: int, arrays: dict | None, num_examples=100, extra: dict | None = None, error: bool = False) -> Message:
    md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                  group_id="1", created_at=time.time(), ttl=100.0, message_type="train")
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})
    if num_examples is not None:
        content["metrics"] = MetricRecord({"num-examples": num_examples})
    for k, v in (extra or {}).items():
        content[k] = v
    if error:
        from flwr.app import Error
        return Message(Error(code=1, reason="boom"), metadata=md)
    return Message(content, metadata=md)


def configured(strategy: SafeFedLLMStrategy, global_arrays: dict, nodes=range(1, 9), server_round: int = 1):
    msgs = list(strategy.configure_train(server_round, numpy_to_array_record(global_arrays), ConfigRecord({}), FakeGrid(nodes)))
    return msgs


def make(probe, tmp_path, **kw):
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("min_available_nodes", 2)
    return SafeFedLLMStrategy(probe, audit_path=tmp_path / "audit.jsonl", state_path=tmp_path / "state.npz", **kw)


def benign_mean(updates):
    return {k: np.mean([u[k] for u in updates], axis=0) for k in updates[0]}


def test_array_record_round_trip_is_zero_copy_for_float32(global_arrays):
    rec = numpy_to_array_record(global_arrays)
    back = array_record_to_numpy(rec)
    for k, v in global_arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert not back[k].flags.writeable  # a view over the message bytes
    f64 = array_record_to_numpy(ArrayRecord({QB0: Array(global_arrays[QB0].astype(np.float64))}))
    assert f64[QB0].dtype == np.float64  # returned as sent; the native round's admission rejects it
    fortran = array_record_to_numpy(ArrayRecord({QB0: Array(np.asfortranarray(global_arrays[QB0]))}))
    np.testing.assert_array_equal(fortran[QB0], global_arrays[QB0])  # the header's order is honoured
    assert fortran[QB0].flags.c_contiguous


def test_malicious_nodes_get_factor_zero_and_global_stays_near_benign_mean(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path)
    msgs = configured(s, global_arrays, nodes=[*range(10, 15), *range(20, 23)])
    assert msgs and msgs[0].content["config"]["safe-fedllm.level"] == "client"
    assert feature_keys_from_config(msgs[0].content["config"]) == probe.feature_keys
    benign = [client_update(global_arrays, rng, False) for _ in range(5)]
    evil = [client_update(global_arrays, rng, True) for _ in range(3)]
    replies = [reply(10 + i, u) for i, u in enumerate(benign)] + [reply(20 + i, u) for i, u in enumerate(evil)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None
    for i in range(3):
        assert metrics[f"factor.{20 + i}"] < 0.05 and metrics[f"verdict.{20 + i}"] == 1
    for i in range(5):
        # New clients are on probation (≤ 0.5); benign ones get all of it.
        assert metrics[f"factor.{10 + i}"] >= 0.5 and metrics[f"verdict.{10 + i}"] == 0
    new = array_record_to_numpy(arrays)
    mean = benign_mean(benign)
    for k in global_arrays:
        assert np.abs(new[k] - mean[k]).max() < 0.02
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["server_round"] == 1 and len(audit[-1]["outcome"]["clients"]) == 8


def npy_bytes(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


class Payload:
    """Unpickling this sets `builtins.SAFE_FEDLLM_PWNED`: proof that no reply is unpickled."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins.SAFE_FEDLLM_PWNED = True",))


@pytest.mark.parametrize("attack", ["float64", "nan", "missing_key", "wrong_shape", "extra_key", "no_count",
                                    "fractional_count", "negative_count", "huge_norm", "lying_metadata",
                                    "pickled_object", "truncated_bytes", "trailing_bytes", "huge_header"])
def test_admission_excludes_bad_replies_without_failing_the_round(attack, probe, global_arrays, rng, tmp_path):
    policy = AdmissionPolicy(norm_bound="absolute", norm_value=100.0, over_bound="exclude")
    s = make(probe, tmp_path, spec={"admission": policy.to_spec()})
    configured(s, global_arrays, nodes=[10, 11, 12, 13, 99])
    benign = [client_update(global_arrays, rng, False) for _ in range(4)]
    bad = dict(client_update(global_arrays, rng, False))
    count = 100
    if attack == "float64":
        bad[QB0] = bad[QB0].astype(np.float64)
    elif attack == "nan":
        bad[QB0] = bad[QB0].copy()
        bad[QB0][0, 0] = np.nan
    elif attack == "missing_key":
        del bad[QB0]
    elif attack == "wrong_shape":
        bad[QB0] = np.zeros((3, 3), np.float32)
    elif attack == "extra_key":
        bad["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = np.zeros((2, 2), np.float32)
    elif attack == "no_count":
        count = None
    elif attack == "fractional_count":
        count = 1.5
    elif attack == "negative_count":
        count = -5
    elif attack == "huge_norm":
        bad = {k: v + 1e6 for k, v in bad.items()}
    elif attack == "lying_metadata":  # declares the global's shape, holds the transpose
        bad[QB0] = Array(dtype="float32", shape=bad[QB0].shape, stype="numpy.ndarray",
                         data=npy_bytes(np.ascontiguousarray(bad[QB0].T)))
    elif attack == "pickled_object":
        bad[QB0] = Array(dtype="float32", shape=bad[QB0].shape, stype="numpy.ndarray",
                         data=npy_bytes(np.array([Payload()], dtype=object), allow_pickle=True))
    elif attack == "truncated_bytes":
        bad[QB0] = Array(dtype="float32", shape=bad[QB0].shape, stype="numpy.ndarray", data=npy_bytes(bad[QB0])[:-4])
    elif attack == "trailing_bytes":
        bad[QB0] = Array(dtype="float32", shape=bad[QB0].shape, stype="numpy.ndarray",
                         data=npy_bytes(bad[QB0]) + b"\0" * 4)
    elif attack == "huge_header":  # a v2 header declaring 1 GiB: numpy's reader bounds it
        data = npy_bytes(bad[QB0])
        bad[QB0] = Array(dtype="float32", shape=bad[QB0].shape, stype="numpy.ndarray",
                         data=b"\x93NUMPY\x02\x00" + (1 << 30).to_bytes(4, "little") + data[10:])
    replies = [reply(10 + i, u) for i, u in enumerate(benign)] + [reply(99, bad, num_examples=count)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["excluded.99"] == 1 and metrics["factor.99"] == 0.0
    assert arrays is not None
    new = array_record_to_numpy(arrays)
    mean = benign_mean(benign)
    for k in global_arrays:
        assert np.abs(new[k] - mean[k]).max() < 1e-3  # factor-weighted benign mean
    audit = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    in_rust = {c["client"]: c for c in audit["outcome"]["clients"]}
    # Every bad reply is rejected by the native admission stage, with a typed
    # reason, whether the strategy could decode it or not.
    assert in_rust["99"]["admission"]["status"] == "rejected" and in_rust["99"]["disposition"] == "rejected"
    assert audit["replies"]["99"]["status"] == "rejected" and audit["replies"]["99"]["reason"]["reason"]
    assert metrics["safe-fedllm.rejected"] == 1 and metrics["safe-fedllm.admitted"] == 4
    assert not hasattr(__import__("builtins"), "SAFE_FEDLLM_PWNED")


def test_inflated_sample_count_is_capped(probe, global_arrays, rng, tmp_path):
    a, b = client_update(global_arrays, rng, False), client_update(global_arrays, rng, False)
    # no norm bound here: only the counts move the weights
    for policy in [AdmissionPolicy(samples="cap_at", sample_value=100, norm_bound=None),
                   AdmissionPolicy(norm_bound=None), AdmissionPolicy(samples="uniform", norm_bound=None)]:
        (tmp_path / policy.samples).mkdir()
        s = make(probe, tmp_path / policy.samples, spec={"admission": policy.to_spec()})
        configured(s, global_arrays, nodes=[1, 2, 3])
        arrays, _ = s.aggregate_train(1, [reply(1, a, 100), reply(2, b, 10**12), reply(3, a, 100)])
        new = array_record_to_numpy(arrays)
        weight_b = 1 / 3  # uniform; cap_at 100; the default caps at the lower median count, 100
        for k in global_arrays:
            # not ~b[k]: the declared 10**12 was capped
            np.testing.assert_allclose(new[k], (1 - weight_b) * a[k] + weight_b * b[k], atol=1e-3)
    with pytest.raises(sf.InvalidParameterError):
        make(probe, tmp_path, spec={"admission": AdmissionPolicy(samples="cap_at_median_multiple", sample_value=0.5).to_spec()})


def test_all_malicious_round_is_skipped_and_global_kept(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path)
    configured(s, global_arrays, nodes=[20, 21, 22, 23])
    evil = [client_update(global_arrays, rng, True) for _ in range(4)]
    arrays, metrics = s.aggregate_train(1, [reply(20 + i, u) for i, u in enumerate(evil)])
    assert arrays is None and metrics["safe-fedllm.skipped"] == 1


def test_round_level_fault_keeps_the_global(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path, spec={"aggregator": {"rule": "krum", "f": 2}})
    configured(s, global_arrays, nodes=[0, 1, 2])
    arrays, metrics = s.aggregate_train(1, [reply(i, client_update(global_arrays, rng, False)) for i in range(3)])
    assert arrays is None
    audit = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    # Too few clients for the rule is a typed skip in the audit, not an error.
    assert audit.get("round_error") is None
    assert audit["outcome"]["skip_reason"]["TooFewClients"]["rule"] == "krum"


def test_step_level_with_feature_key_trails(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path, spec={"detector": {"level": "step", "batch_size": 10}, "gate": {"threshold": 0.0}})
    msgs = configured(s, global_arrays, nodes=[1, 2, 3])
    keys = feature_keys_from_config(msgs[0].content["config"])
    assert msgs[0].content["config"]["safe-fedllm.step-trail"]

    def run(malicious: bool):
        target = client_update(global_arrays, rng, malicious)
        state = {k: v.copy() for k, v in global_arrays.items()}
        i = 0

        def step():
            nonlocal i
            i += 1
            for k in state:
                state[k] = (global_arrays[k] + (target[k] - global_arrays[k]) * i / 3).astype(np.float32)
            return state

        final, trail = record_steps(step, 3, keys)
        return final, trail

    honest, honest_trail = run(False)
    evil, evil_trail = run(True)
    _, fake_trail = run(False)  # a benign-looking trail that does not end at the update
    replies = [
        reply(1, honest, 30, {STEPS_KEY: ArrayRecord({k: Array(v) for k, v in honest_trail.to_arrays().items()})}),
        reply(2, evil, 30, {STEPS_KEY: ArrayRecord({k: Array(v) for k, v in evil_trail.to_arrays().items()})}),
        reply(3, evil, 30, {STEPS_KEY: ArrayRecord({k: Array(v) for k, v in fake_trail.to_arrays().items()})}),
    ]
    # the trail carries only the feature tensors: small
    assert set(k.split("/", 1)[1] for k in honest_trail.to_arrays()) == set(keys)
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["factor.1"] >= 0.5  # probation caps a new client at 0.5
    assert metrics["factor.2"] < 0.1
    assert metrics["factor.3"] == 0.0 and metrics["verdict.3"] == 1  # trail mismatch
    outcome = s.last_outcome["outcome"]
    assert {c["client"]: c["trail"]["status"] for c in outcome["clients"]} == {"1": "verified", "2": "verified", "3": "mismatch"}


def test_shadow_level_sends_the_fixed_base_and_reads_shadow_trails(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path, spec={"detector": {"level": "shadow", "batch_size": 10}})
    msgs = configured(s, global_arrays, nodes=[1, 2, 3])
    base_rec = msgs[0].content[SHADOW_BASE_KEY]
    base = array_record_to_numpy(base_rec)
    keys = feature_keys_from_config(msgs[0].content["config"])
    # round 2: the global moved, the shadow base did not
    moved = {k: v + 0.5 for k, v in global_arrays.items()}
    msgs2 = configured(s, moved, nodes=[1, 2, 3], server_round=2)
    for k in base:
        np.testing.assert_array_equal(array_record_to_numpy(msgs2[0].content[SHADOW_BASE_KEY])[k], global_arrays[k])

    def shadow_trail(malicious: bool) -> StepTrail:
        branch = ShadowBranch(base, keys)

        def train(start, lr):
            target = client_update(start, rng, malicious)
            for i in range(1, 4):
                yield {k: (start[k] + (target[k] - start[k]) * i / 3).astype(np.float32) for k in start}

        return branch.run(train)

    replies = []
    for node, malicious in [(1, False), (2, False), (3, True)]:
        trail = shadow_trail(malicious)
        extra = {SHADOW_KEY: ArrayRecord({k: Array(v) for k, v in trail.to_arrays().items()})}
        replies.append(reply(node, client_update(moved, rng, False), 30, extra))
    _, metrics = s.aggregate_train(2, replies)
    assert metrics["factor.1"] > 0.9 and metrics["factor.2"] > 0.9
    assert metrics["factor.3"] < 0.05
    saved = StrategyState.load(str(tmp_path / "state.npz"))
    for k in base:
        np.testing.assert_array_equal(saved.shadow_base[k], global_arrays[k])


def test_fortran_order_upload_is_read_correctly(probe, global_arrays, rng, tmp_path):
    ups = [client_update(global_arrays, rng, False) for _ in range(4)]
    fortran = {k: np.asfortranarray(v) for k, v in ups[0].items()}
    news = []
    for first, folder in ((fortran, "fortran"), (ups[0], "c_order")):
        (tmp_path / folder).mkdir()
        s = make(probe, tmp_path / folder)
        configured(s, global_arrays, nodes=[1, 2, 3, 4])
        arrays, metrics = s.aggregate_train(1, [reply(1, first)] + [reply(i + 2, u) for i, u in enumerate(ups[1:])])
        assert metrics["excluded.1"] == 0
        news.append(array_record_to_numpy(arrays))
    for k in global_arrays:  # the same round as the C-order upload
        np.testing.assert_array_equal(news[0][k], news[1][k])


def test_evidence_level_stops_asking_frozen_benign_clients_for_a_shadow_branch(probe, global_arrays, rng, tmp_path):
    s = make(probe, tmp_path, spec={"detector": {"level": "evidence", "shadow": {"batch_size": 10}, "evidence_min": 2, "audit_interval": 100}})
    msgs = configured(s, global_arrays, nodes=[1, 2, 3])
    assert all(m.content["config"]["safe-fedllm.shadow"] for m in msgs)
    keys = feature_keys_from_config(msgs[0].content["config"])
    base = array_record_to_numpy(msgs[0].content[SHADOW_BASE_KEY])

    def shadow(malicious):
        def train(start, lr):
            target = client_update(start, rng, malicious)
            yield {k: target[k] for k in start}
        trail = ShadowBranch(base, keys).run(train)
        return {SHADOW_KEY: ArrayRecord({k: Array(v) for k, v in trail.to_arrays().items()})}

    for server_round in (1, 2):
        configured(s, global_arrays, nodes=[1, 2, 3], server_round=server_round)
        s.aggregate_train(server_round, [reply(n, client_update(global_arrays, rng, False), 30, shadow(n == 3)) for n in (1, 2, 3)])
    msgs = {m.metadata.dst_node_id: m for m in configured(s, global_arrays, nodes=[1, 2, 3], server_round=3)}
    # two agreeing benign verdicts froze nodes 1 and 2; node 3 (malicious) is frozen too
    assert not msgs[1].content["config"]["safe-fedllm.shadow"] and SHADOW_BASE_KEY not in msgs[1].content
    assert msgs[1].content["arrays"] is not None
