"""The defense spec from Python: the shared fixture (fixtures/spec) gives the same
round as the Rust library and the command-line tool (fixtures/spec/expected.json),
and a misspelt key raises SpecError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safe_fedllm as sf

SPEC_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "spec"
UPLOADS = [("alice", 100), ("bob", 100), ("carol", 120), ("mallory", 100)]


def projection(outcome: dict) -> dict:
    """The fields every front end must agree on (as in tests/defense_spec.rs)."""
    return {
        "clients": [
            {k: c[k] for k in ("client", "disposition", "verdict", "factor", "samples")}
            for c in outcome["clients"]
        ],
        "mean_factor": outcome["mean_factor"],
        "skipped": outcome["skipped"],
        "threshold": outcome["threshold"],
        "spec_sha256": outcome["spec_sha256"],
    }


def run(rnd: sf.DefendedRound) -> dict:
    global_ = sf.Adapter.load(SPEC_DIR / "global.safetensors")
    reports = [
        {"client": c, "update": sf.Adapter.load(SPEC_DIR / f"{c}.safetensors"), "samples": n}
        for c, n in UPLOADS
    ]
    return rnd.run(0, global_, reports)


def test_the_fixture_spec_file_gives_the_rust_round():
    outcome = run(sf.DefendedRound.from_spec(SPEC_DIR / "defense.toml"))
    expected = json.loads((SPEC_DIR / "expected.json").read_text())
    got = projection(json.loads(outcome["audit_line"]))
    assert got == expected


def test_a_spec_dict_names_its_settings_and_a_probe_can_be_given():
    spec = {"detector": {"level": "client"}, "aggregator": {"rule": "fedavg"}, "gate": {"threshold": 0.2}}
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound.from_spec(spec)  # names no probe, none given
    assert info.value.key == "probe"


@pytest.mark.parametrize(
    "spec, key, suggestion",
    [
        ({"gate": {"threshhold": 0.3}}, "gate.threshhold", "threshold"),
        ({"detector": {"level": "client", "steepnes": 3.0}}, "detector.steepnes", "steepness"),
        ({"aggregator": {"rule": "krumm", "f": 1}}, "aggregator.rule", "krum"),
        ({"trial": "exact"}, "trial", "trail"),
    ],
)
def test_misspelt_keys_raise_spec_error(spec, key, suggestion):
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound.from_spec(spec)
    assert info.value.key == key
    assert info.value.suggestion == suggestion
    assert isinstance(info.value, sf.InvalidParameterError)


def test_out_of_range_values_raise_spec_error():
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound.from_spec({"detector": {"level": "client", "steepness": -1.0}})
    assert info.value.key == "detector.steepness"
