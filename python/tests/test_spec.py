"""The defense spec from Python: the shared fixture (fixtures/spec) gives the same
round as the Rust library and the command-line tool (fixtures/spec/expected.json),
and a misspelt key raises SpecError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safe_fedllm as sf
from conftest import client_update

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


# -- the keyword constructors read the same spec sections ------------------------

def test_rule_settings_are_the_spec_aggregator_section():
    agg = sf.Aggregator("multi_krum", f=1, m=3, weighting="samples")
    assert agg.settings == {"rule": "multi_krum", "f": 1, "m": 3, "weighting": "samples"}
    header = sf.check_spec({"aggregator": agg.settings})
    assert header["spec"]["aggregator"] == agg.settings


def test_keyword_round_is_a_spec_and_hashes_like_from_spec(probe, global_arrays, rng):
    """The keyword constructor assembles a spec and checks it with the one
    parser: its hash is the one from_spec gives for the same spec."""
    rnd = sf.DefendedRound(probe, sf.Detector("client", steepness=12.0), sf.Aggregator("krum", f=1),
                           skip_avg_weight=0.3, trail={"max_abs": 0.25}, admission="reference")
    assert rnd.spec["detector"] == {"level": "client", **sf.Detector("client", steepness=12.0).settings}
    assert rnd.spec["gate"] == {"threshold": 0.3} and rnd.spec["trail"] == {"max_abs": 0.25}
    assert rnd.spec_sha256 == sf.check_spec(rnd.spec)["spec_sha256"]
    same = sf.DefendedRound.from_spec(rnd.spec, probe=probe)
    assert same.spec_sha256 == rnd.spec_sha256
    reports = [{"client": f"b{i}", "update": client_update(global_arrays, rng, False), "samples": 10} for i in range(6)]
    assert json.loads(rnd.run(0, global_arrays, reports)["audit_line"])["spec_sha256"] == rnd.spec_sha256
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"), trail="exakt")
    assert info.value.key == "trail"


def test_a_round_refuses_a_rule_with_gates_of_its_own(probe):
    """The round has one safety gate (`skip_avg_weight`) and the spec's factor
    gate: a standalone wrapper inside it would be a second, unrecorded one."""
    with pytest.raises(sf.InvalidParameterError) as info:
        sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg", skip_avg_weight=0.5))
    assert info.value.name == "aggregator"
    with pytest.raises(sf.InvalidParameterError):
        sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("median", gate=True))


def test_a_detectors_state_survives_the_keyword_constructor(probe):
    d = sf.Detector("client")
    d.assess(0, "evil", 100, last_score=0.99)
    rnd = sf.DefendedRound(probe, d, sf.Aggregator("fedavg"))
    assert rnd.detector.to_json() == d.to_json()


def test_an_audited_spec_runs_only_with_the_servers_secret(probe):
    spec = {"detector": {"level": "evidence"}, "audits": {"rate": 0.25}}
    header = sf.check_spec(spec)
    assert header["spec"]["audits"] == {"rate": 0.25}
    # Unkeyed: the round refuses to run rather than announce its audits.
    with pytest.raises(sf.SpecError) as info:
        run(sf.DefendedRound.from_spec(spec, probe=probe))
    assert info.value.key == "audits"
    # The secret is 32 bytes, never a spec setting.
    with pytest.raises(sf.InvalidParameterError):
        sf.DefendedRound.from_spec(spec, probe=probe, audit_secret=b"short")
    keyed = sf.DefendedRound.from_spec(spec, probe=probe, audit_secret=bytes(range(32)))
    assert keyed.spec_sha256 == header["spec_sha256"]
    # A secret for a spec without audits is refused, not ignored.
    with pytest.raises(sf.SpecError):
        sf.DefendedRound.from_spec({"detector": {"level": "client"}}, probe=probe, audit_secret=bytes(32))
    with pytest.raises(sf.SpecError) as info:
        sf.check_spec({"audits": {"rate": 0.0}})
    assert info.value.key == "audits.rate"
