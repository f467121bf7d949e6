"""End-to-end: a real Flower deployment on 127.0.0.1 (deployment engine,
insecure mode, no runtime dependency installation, telemetry off).

One SuperLink and five SuperNodes (two of them malicious: 40 %), three rounds
of `flwr run` with the app in `tests/flower_app`. Asserts from the server's
output (summary + audit written by the ServerApp) that the malicious nodes got
factor ≈ 0 every round and the global adapter stayed near the benign mean.
The ServerApp is configured by the run_config alone: a defense spec file
(written here, with the probe it names) and `safe-fedllm.spec.*` settings;
every audit line records the hash of exactly that spec.

The test starts and stops only its own processes: it records the PIDs it
spawns, SIGTERMs them, and waits for their `flower-superexec` children. On a
timeout or failure it shows their logs. Skipped when `flower-superlink` is
not on PATH (Flower not installed); `SAFE_FEDLLM_SKIP_DEPLOYMENT=1` skips it too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

import safe_fedllm as sf
from safe_fedllm.state import StrategyState

APP = Path(__file__).parent / "flower_app"
NODES = 5
MALICIOUS = {0, 1}
ROUNDS = 3
RUN_TIMEOUT = 300

_SEARCH = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
_FOUND = shutil.which("flower-superlink", path=_SEARCH) is not None
if os.environ.get("SAFE_FEDLLM_REQUIRE_DEPLOYMENT") == "1" and not _FOUND:
    raise RuntimeError("SAFE_FEDLLM_REQUIRE_DEPLOYMENT=1 but flower-superlink is not installed")
pytestmark = pytest.mark.skipif(
    not _FOUND or os.environ.get("SAFE_FEDLLM_SKIP_DEPLOYMENT") == "1",
    reason="needs Flower's flower-superlink (pip install flwr)",
)


def defense_file(root: Path) -> Path:
    """The offline phase: the probe and the spec naming it (see the app's task.py)."""
    sys.path.insert(0, str(APP))
    try:
        from e2e_app.task import write_defense
    finally:
        sys.path.remove(str(APP))
    return write_defense(root / "defense")


def expected_spec_sha256(spec_file: Path, level: str) -> str:
    """The hash of the spec the run_config describes, merged by hand: the file,
    with the app's declared settings (level, rule) over it."""
    spec = tomllib.loads(spec_file.read_text())
    spec["detector"] = {"level": level}
    spec["aggregator"] = {"rule": "fedavg"}
    return sf.check_spec(spec, base_dir=spec_file.parent)["spec_sha256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


class Deployment:
    """Starts a SuperLink and SuperNodes; stops exactly what it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.port = free_port()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        )
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n'
            f'[superlink.local-deployment]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        self.procs.append((name, proc))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], capture_output=True, text=True, env=self.env, cwd=self.root, timeout=timeout)

    def start(self) -> None:
        self.spawn("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])
        self.wait_for(lambda: self.healthy(), 60, "SuperLink health")
        for i in range(NODES):
            malicious = "true" if i in MALICIOUS else "false"
            self.spawn(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={NODES} malicious={malicious}",
            ])
        self.wait_for(lambda: self.online() >= NODES, 90, f"{NODES} SuperNodes online")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def online(self) -> int:
        out = self.flwr("supernode", "ls", "local-deployment", "--format", "json")
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except (json.JSONDecodeError, AttributeError):
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for(self, check, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.dump()}")
            if check():
                return
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}\n{self.dump()}")

    def dump(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"----- {log.name} (last 4000 chars) -----\n{text[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM our processes, then wait for them and their superexec children."""
        kids = {pid for _, p in self.procs for pid in children(p.pid)}
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while kids and time.monotonic() < deadline:
            kids = {k for k in kids if alive(k)}
            time.sleep(0.5)
        for k in kids:  # children we saw start under our own processes
            try:
                os.kill(k, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


# client: the server recomputes everything from the update. step: clients send
# a step trail (feature tensors only), checked against the update. evidence:
# clients train a shadow branch from the fixed shadow base (self-reported).
@pytest.mark.parametrize("level", ["client", "step", "evidence"])
def test_defended_rounds_in_a_real_deployment(deployment: Deployment, level: str):
    out_dir = deployment.root / f"out-{level}"
    spec_file = defense_file(deployment.root)
    run = deployment.flwr(
        "run", str(APP), "local-deployment", "--stream",
        "--run-config", f'num-server-rounds={ROUNDS} num-nodes={NODES} out-dir="{out_dir}" '
        f'safe-fedllm.spec-file="{spec_file}" safe-fedllm.spec.detector.level="{level}"',
        timeout=RUN_TIMEOUT,
    )
    (deployment.logs / f"flwr-run-{level}.log").write_text(run.stdout + "\n" + run.stderr)
    # `flwr run` exits 0 even when the ServerApp fails: check the runs' status.
    ls = deployment.flwr("ls", "local-deployment", "--format", "json")
    runs = json.loads(ls.stdout).get("runs", [])
    assert runs and all(r.get("status") == "finished:completed" for r in runs), (ls.stdout, deployment.dump())

    summary_line = next((l for l in run.stdout.splitlines() if "SAFE-FEDLLM-E2E " in l), None)
    assert summary_line is not None, run.stdout[-4000:] + deployment.dump()
    summary = json.loads(summary_line.split("SAFE-FEDLLM-E2E ", 1)[1])
    assert summary == json.loads((out_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    assert len(rounds) == ROUNDS
    for r in rounds:
        assert len(r["factors"]) == NODES
        assert sum(r["malicious"].values()) == len(MALICIOUS)  # 40 % malicious
        for node, factor in r["factors"].items():
            if r["malicious"][node]:
                assert factor < 0.05, (level, r, node)
            else:
                assert factor >= 0.5, (level, r, node)  # new clients: probation at 0.5
        assert not r["skipped"]
        # Near the benign mean, far from the plain (poisoned) mean.
        assert r["max_abs_to_benign_mean"] < 0.2 * r["max_abs_to_plain_mean"], r

    audit = [json.loads(l) for l in (out_dir / "audit.jsonl").read_text().splitlines()]
    assert [a["server_round"] for a in audit] == list(range(1, ROUNDS + 1))
    evidence = {"client": "absent", "step": "last_step_verified", "evidence": "absent"}[level]
    sha = expected_spec_sha256(spec_file, level)
    for a in audit:
        assert a["outcome"]["spec_sha256"] == sha, (a["outcome"]["spec_sha256"], sha)
        for c in a["outcome"]["clients"]:
            assert c["step_evidence"] == evidence, c
            if level == "evidence":
                assert c["shadow_evidence"] == "server_scored_unverified", c
        # every sampled node accounted for; totals as the reply table says
        statuses = [r["status"] for r in a["replies"].values()]
        assert a["totals"]["safe-fedllm.sampled"] == NODES == len(statuses), a["totals"]
        for status in ("admitted", "rejected", "failed", "dropped"):
            assert a["totals"][f"safe-fedllm.{status}"] == statuses.count(status), (status, a["totals"])
        # identities are the SuperNodes' public keys (hashed), as the SuperLink reports them
        assert all(r["client"].startswith("pk:") for r in a["replies"].values()), a["replies"]
    state = StrategyState.load(str(out_dir / "state.npz"))
    assert state.completed_rounds == ROUNDS and state.level == level
    assert sorted(state.global_arrays) == summary["final_keys"]


def _digest(arrays) -> str:
    import hashlib

    import numpy as np
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k], dtype=np.float32).tobytes())
    return h.hexdigest()


# Runs last: its first run ends `finished:failed` on purpose.
def test_serverapp_killed_mid_run_resumes_from_the_state_file(deployment: Deployment):
    """The ServerApp exits hard after round 2 of 4; a second `flwr run` with the
    same state file runs rounds 3 and 4 from the saved global, with the same
    per-client identities and memory, and the audit reads 1, 2, 3, 4."""
    out_dir = deployment.root / "out-restart"
    spec_file = defense_file(deployment.root)
    config = f'num-server-rounds=4 num-nodes={NODES} out-dir="{out_dir}" safe-fedllm.spec-file="{spec_file}"'
    first = deployment.flwr("run", str(APP), "local-deployment", "--stream", "--run-config",
                            config + " kill-after-round=2", timeout=RUN_TIMEOUT)
    (deployment.logs / "flwr-run-killed.log").write_text(first.stdout + "\n" + first.stderr)
    audit_path = out_dir / "audit.jsonl"
    assert [json.loads(l)["server_round"] for l in audit_path.read_text().splitlines()] == [1, 2], deployment.dump()
    after_two = StrategyState.load(str(out_dir / "state.npz"))
    assert after_two.completed_rounds == 2

    second = deployment.flwr("run", str(APP), "local-deployment", "--stream", "--run-config", config,
                             timeout=RUN_TIMEOUT)
    (deployment.logs / "flwr-run-resumed.log").write_text(second.stdout + "\n" + second.stderr)
    runs = json.loads(deployment.flwr("ls", "local-deployment", "--format", "json").stdout).get("runs", [])
    latest = max(runs, key=lambda r: r.get("pending-at", ""))
    assert latest.get("status") == "finished:completed", (runs, deployment.dump())
    assert sum(r.get("status") == "finished:failed" for r in runs) == 1  # the killed run

    audit = [json.loads(l) for l in audit_path.read_text().splitlines()]
    assert [a["server_round"] for a in audit] == [1, 2, 3, 4]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["server_round"] for r in summary["rounds"]] == [3, 4]
    # round 3 started from the global saved after round 2 (not the initial arrays)
    assert summary["rounds"][0]["start_sha"] == _digest(after_two.global_arrays)
    # same nodes, same identities, and the malicious ones still get factor ≈ 0
    assert {n: r["client"] for n, r in audit[1]["replies"].items()} == {n: r["client"] for n, r in audit[2]["replies"].items()}
    for r in summary["rounds"]:
        for node, factor in r["factors"].items():
            assert (factor < 0.05) if r["malicious"][node] else (factor >= 0.5), (r, node)
    final = StrategyState.load(str(out_dir / "state.npz"))
    assert final.completed_rounds == 4
    for client in {r["client"] for r in audit[1]["replies"].values()}:
        assert client in json.dumps(final.detector)
