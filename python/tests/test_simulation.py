"""Flower's simulation runtime: the same app as the deployment test, run by
``flwr run`` on a local simulation SuperLink (Ray backend) with 50 virtual
clients, 20 of them malicious (40 %), for 3 rounds.

Needs ``flwr[simulation]`` (Ray); skipped without it unless
``SAFE_FEDLLM_REQUIRE_SIMULATION=1``. ``flwr run`` starts a detached
``flower-superlink --simulation`` on the port this test chooses
(``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``); the test stops exactly that process
(found by its command line, port included) and waits for its children.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe_fedllm.state import StrategyState
from test_deployment import alive, children, defense_file, free_port

APP = Path(__file__).parent / "flower_app"
CLIENTS = 50
MALICIOUS = 20
ROUNDS = 3

_RAY = importlib.util.find_spec("ray") is not None
if os.environ.get("SAFE_FEDLLM_REQUIRE_SIMULATION") == "1" and not _RAY:
    raise RuntimeError("SAFE_FEDLLM_REQUIRE_SIMULATION=1 but ray is not installed (pip install 'flwr[simulation]')")
pytestmark = pytest.mark.skipif(not _RAY, reason="needs flwr[simulation] (Ray)")


def simulation_superlinks(port: int) -> list[int]:
    """PIDs of `flower-superlink --simulation` processes serving `port`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if any(w.endswith("flower-superlink") for w in words) and "--simulation" in words and str(port) in words:
            out.append(int(proc.name))
    return out


def stop(pids: list[int]) -> None:
    kids = {k for p in pids for k in children(p)}
    for p in pids:
        os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in [*pids, *kids]):
        time.sleep(0.5)


def test_fifty_virtual_clients_under_the_simulation_runtime(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    port = free_port()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    out_dir = tmp_path / "out"
    try:
        run = subprocess.run(
            ["flwr", "run", str(APP), "local", "--stream",
             "--federation-config", f"num-supernodes={CLIENTS}",
             "--run-config", f'num-server-rounds={ROUNDS} num-nodes={CLIENTS} num-malicious={MALICIOUS} '
             f'out-dir="{out_dir}" safe-fedllm.spec-file="{defense_file(tmp_path)}"'],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        ls = subprocess.run(["flwr", "ls", "local", "--format", "json"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60)
    finally:
        stop(simulation_superlinks(port))
    log = run.stdout[-4000:] + run.stderr[-4000:]
    runs = json.loads(ls.stdout).get("runs", [])
    assert runs and all(r.get("status") == "finished:completed" for r in runs), (ls.stdout, log)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(summary["rounds"]) == ROUNDS
    for r in summary["rounds"]:
        assert len(r["factors"]) == CLIENTS and sum(r["malicious"].values()) == MALICIOUS
        for node, factor in r["factors"].items():
            assert (factor < 0.05) if r["malicious"][node] else (factor >= 0.5), (r["server_round"], node, factor)
        assert not r["skipped"]
        assert r["max_abs_to_benign_mean"] < 0.2 * r["max_abs_to_plain_mean"], r
    audit = [json.loads(line) for line in (out_dir / "audit.jsonl").read_text().splitlines()]
    assert [a["server_round"] for a in audit] == list(range(1, ROUNDS + 1))
    for a in audit:
        assert a["totals"]["safe-fedllm.sampled"] == CLIENTS == a["totals"]["safe-fedllm.admitted"]
    assert StrategyState.load(str(out_dir / "state.npz")).completed_rounds == ROUNDS
