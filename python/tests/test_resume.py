"""Durable resume: a ServerApp killed mid-run and started again continues the
round count, the global and every client's trust from the state file; the
audit log has each round exactly once; identities follow the SuperNode's
public key, not its node id."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.proto.node_pb2 import NodeInfo  # noqa: E402

import safe_fedllm as sf  # noqa: E402
from safe_fedllm.flower import array_record_to_numpy, numpy_to_array_record  # noqa: E402
from safe_fedllm.state import STATE_VERSION, StrategyState  # noqa: E402
from conftest import client_update  # noqa: E402
from test_strategy import _run_identity, make  # noqa: E402,F401

EVIL_KEY = b"evil-supernode-public-key"


class LoopGrid:
    """A Grid that answers ``send_and_receive`` in-process: each node trains
    from the arrays it was sent (``global + noise``, or a malicious move).

    ``keys`` maps node id -> public key (what the SuperLink reports); a node
    that reconnects gets a new id with the same key.
    """

    def __init__(self, keys: dict[int, bytes], evil: set[bytes], seed: int = 0, drop: int | None = None):
        self.keys = dict(keys)
        self.evil = evil
        self.rng = np.random.default_rng(seed)
        self.drop = drop
        self.sent_rounds: list[dict[str, np.ndarray]] = []

    def get_node_ids(self):
        return list(self.keys)

    def get_nodes(self):
        return [NodeInfo(node_id=n, public_key=k) for n, k in self.keys.items()]

    def reconnect(self, old: int, new: int) -> None:
        self.keys[new] = self.keys.pop(old)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        messages = list(messages)
        if not messages:  # the evaluate phase (fraction_evaluate=0)
            return []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Grid.push_messages does
        self.sent_rounds.append(array_record_to_numpy(messages[0].content["arrays"]))
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == self.drop:
                continue
            start = array_record_to_numpy(msg.content["arrays"])
            update = client_update(start, self.rng, self.keys[node] in self.evil)
            md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                          reply_to_message_id=msg.metadata.message_id, group_id="1",
                          created_at=time.time(), ttl=100.0, message_type="train")
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                  "metrics": MetricRecord({"num-examples": 50, "train_loss": 1.0})})
            replies.append(Message(content, metadata=md))
        return replies


def keys_for(nodes) -> dict[int, bytes]:
    return {n: (EVIL_KEY if n == 7 else f"key-{n}".encode()) for n in nodes}


def audit_rounds(tmp_path) -> list[int]:
    return [json.loads(l)["server_round"] for l in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_restarted_strategy_continues_rounds_global_and_trust(probe, global_arrays, tmp_path):
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    first = make(probe, tmp_path)
    r1 = first.start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=2)
    assert audit_rounds(tmp_path) == [1, 2] and first.completed_rounds == 2
    after_two = array_record_to_numpy(r1.arrays)
    detector_before = StrategyState.load(str(tmp_path / "state.npz")).detector
    del first  # the ServerApp process dies here

    # A new ServerApp: a fresh strategy from the same files, a fresh model
    # init as initial_arrays, the same total number of rounds (4).
    second = make(probe, tmp_path)
    assert second.completed_rounds == 2
    fresh_init = {k: np.zeros_like(v) for k, v in global_arrays.items()}
    r2 = second.start(grid=grid, initial_arrays=numpy_to_array_record(fresh_init), num_rounds=4)
    assert audit_rounds(tmp_path) == [1, 2, 3, 4]  # no repeated round numbers
    assert sorted(r2.train_metrics_clientapp) == [3, 4]
    assert r2.train_metrics_clientapp[3]["train_loss"] == pytest.approx(1.0)
    # round 3 started from the global saved after round 2, not from fresh_init
    for k in global_arrays:
        np.testing.assert_array_equal(grid.sent_rounds[2][k], after_two[k])
    # the detector kept its memory of every client (same keys, longer history)
    state = StrategyState.load(str(tmp_path / "state.npz"))
    assert state.completed_rounds == 4
    assert json.dumps(detector_before) != json.dumps(state.detector)
    for client in {r["client"] for r in json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])["replies"].values()}:
        assert client in json.dumps(state.detector)
    # a third start with everything done runs nothing and returns the saved global
    third = make(probe, tmp_path)
    r3 = third.start(grid=grid, initial_arrays=numpy_to_array_record(fresh_init), num_rounds=4)
    assert audit_rounds(tmp_path) == [1, 2, 3, 4]
    for k in global_arrays:
        np.testing.assert_array_equal(array_record_to_numpy(r3.arrays)[k], state.global_arrays[k])


def _evil_entry(line: dict) -> dict:
    client = next(r["client"] for r in line["replies"].values() if r["client"] == _evil_id())
    return next(c for c in line["outcome"]["clients"] if c["client"] == client)


def _evil_id() -> str:
    import hashlib
    return "pk:" + hashlib.sha256(EVIL_KEY).hexdigest()[:24]


def test_trust_survives_a_restart_and_a_reconnect_with_a_new_node_id(probe, global_arrays, tmp_path):
    """The malicious client's low running factor carries over a ServerApp
    restart and a SuperLink-style reconnect (new node id, same public key),
    where a fresh strategy would start it from scratch."""
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=2)
    grid.reconnect(7, 70)  # the SuperLink restarted: new node id, same key
    grid.evil = set()      # ... and the client now sends a benign update
    make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=3)
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[2])
    assert line["replies"]["70"]["client"] == _evil_id()
    resumed = _evil_entry(line)["factor"]

    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = make(probe, fresh_dir)
    fresh.start(grid=LoopGrid({**keys_for(range(1, 7)), 70: EVIL_KEY}, set()),
                initial_arrays=numpy_to_array_record(global_arrays), num_rounds=1)
    fresh_line = json.loads((fresh_dir / "audit.jsonl").read_text().splitlines()[0])
    # A fresh strategy gives the key a new client's probation factor (0.5);
    # the resumed one keeps its low running factor.
    assert _evil_entry(fresh_line)["factor"] >= 0.5 > resumed


def test_node_id_identity_forgets_a_reconnected_client(probe, global_arrays, tmp_path):
    """What an operator without stable keys gets: a new node id is a new client."""
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    make(probe, tmp_path, identity="node_id").start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=2)
    grid.reconnect(7, 70)
    grid.evil = set()
    make(probe, tmp_path, identity="node_id").start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=3)
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[2])
    assert line["replies"]["70"]["client"] == "70"
    # A new client: the probation factor, not the old low one.
    assert next(c for c in line["outcome"]["clients"] if c["client"] == "70")["factor"] >= 0.5


def test_audit_is_completed_after_a_crash_between_state_and_audit(probe, global_arrays, tmp_path):
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=2)
    audit = tmp_path / "audit.jsonl"
    lines = audit.read_text().splitlines()
    # the process died while appending round 2's line: half of it is on disk
    audit.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    make(probe, tmp_path)
    assert audit.read_text().splitlines() == lines


def test_state_file_is_replaced_atomically_and_versioned(probe, global_arrays, tmp_path):
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=1)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    state = StrategyState.load(str(tmp_path / "state.npz"))
    assert state.completed_rounds == 1 and state.last_audit_line["server_round"] == 1
    state.save(str(tmp_path / "copy.npz"))
    raw = np.load(tmp_path / "copy.npz", allow_pickle=False)
    header = json.loads(bytes(raw["state.json"]).decode())
    assert header["version"] == STATE_VERSION
    header["version"] = STATE_VERSION + 1
    arrays = {k: raw[k] for k in raw.files}
    arrays["state.json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(sf.CheckpointError, match="version"):
        StrategyState.load(str(tmp_path / "future.npz"))
    (tmp_path / "torn.npz").write_bytes((tmp_path / "copy.npz").read_bytes()[:100])
    with pytest.raises(sf.CheckpointError):
        StrategyState.load(str(tmp_path / "torn.npz"))


def test_a_state_file_of_another_model_or_level_is_refused(probe, global_arrays, tmp_path):
    grid = LoopGrid(keys_for(range(1, 8)), {EVIL_KEY})
    make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(global_arrays), num_rounds=1)
    with pytest.raises(sf.CheckpointError, match="level"):
        make(probe, tmp_path, spec={"detector": {"level": "step"}})
    other = {k.replace("q_proj", "k_proj"): v for k, v in global_arrays.items()}
    with pytest.raises(sf.CheckpointError, match="not the same model"):
        make(probe, tmp_path).start(grid=grid, initial_arrays=numpy_to_array_record(other), num_rounds=2)
