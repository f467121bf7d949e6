"""The strategy configured by a defense spec: from Flower's run_config (a spec
file plus `safe-fedllm.spec.<section>.<key>` settings), from a dict, and from
the deprecated keywords. The shared fixture (fixtures/spec) run through the
strategy gives the Rust round (fixtures/spec/expected.json)."""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import safe_fedllm as sf  # noqa: E402
from safe_fedllm.flower import AdmissionPolicy, SafeFedLLMStrategy, spec_from_run_config  # noqa: E402
from test_spec import SPEC_DIR, UPLOADS, projection  # noqa: E402
from test_strategy import _run_identity, configured, reply  # noqa: E402,F401

SPEC_FILE = SPEC_DIR / "defense.toml"
EXPECTED = json.loads((SPEC_DIR / "expected.json").read_text())


def fixture_arrays(name: str) -> dict:
    return sf.Adapter.load(SPEC_DIR / f"{name}.safetensors").to_arrays()


def run_fixture_round(strategy: SafeFedLLMStrategy) -> tuple[dict, dict[str, str]]:
    """The fixture's four uploads as Flower replies from nodes 1..4; returns the
    audit line's outcome and the node -> fixture client map."""
    configured(strategy, fixture_arrays("global"), nodes=range(1, len(UPLOADS) + 1))
    replies = [reply(i + 1, fixture_arrays(name), num_examples=n) for i, (name, n) in enumerate(UPLOADS)]
    strategy.aggregate_train(1, replies)
    names = {str(i + 1): name for i, (name, _) in enumerate(UPLOADS)}
    return strategy.last_outcome["outcome"], names


def strategy_from(run_config: dict, tmp_path: Path, **kw) -> SafeFedLLMStrategy:
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("min_available_nodes", 2)
    return SafeFedLLMStrategy.from_run_config(run_config, audit_path=tmp_path / "audit.jsonl", **kw)


def test_the_fixture_spec_file_through_run_config_gives_the_rust_round(tmp_path):
    """One TOML, unchanged: the strategy's audit line matches the Rust and CLI round."""
    s = strategy_from({"safe-fedllm.spec-file": str(SPEC_FILE), "num-server-rounds": 3}, tmp_path)
    assert s.spec_sha256 == EXPECTED["spec_sha256"]
    outcome, names = run_fixture_round(s)
    got = projection(json.loads(outcome["audit_line"]))
    for c in got["clients"]:
        c["client"] = names[c["client"]]
    assert got == EXPECTED
    audit = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["outcome"]["spec_sha256"] == EXPECTED["spec_sha256"]


def test_a_relative_spec_file_is_read_against_base_dir(tmp_path):
    s = strategy_from({"safe-fedllm.spec-file": SPEC_FILE.name}, tmp_path, base_dir=SPEC_DIR)
    assert s.spec_sha256 == EXPECTED["spec_sha256"]


def test_run_config_settings_override_the_file_and_move_the_decision(tmp_path):
    """A gate above the fixture's mean factor (0.748) skips the round; the hash
    is the one the same spec, written out by hand, has."""
    config = {"safe-fedllm.spec-file": str(SPEC_FILE), "safe-fedllm.spec.gate.threshold": 0.9}
    s = strategy_from(config, tmp_path)
    by_hand = tomllib.loads(SPEC_FILE.read_text())
    by_hand["gate"]["threshold"] = 0.9
    assert s.spec["gate"] == {"threshold": 0.9}
    assert s.spec_sha256 == sf.check_spec(by_hand, base_dir=SPEC_DIR)["spec_sha256"] != EXPECTED["spec_sha256"]
    outcome, _ = run_fixture_round(s)
    assert outcome["skipped"]
    assert outcome["mean_factor"] == pytest.approx(EXPECTED["mean_factor"])


def test_run_config_alone_is_a_spec_on_the_safe_defaults(tmp_path, probe):
    s = strategy_from({"safe-fedllm.spec.detector.level": "step", "safe-fedllm.spec.detector.batch_size": 10,
                       "safe-fedllm.spec.aggregator.rule": "median", "num-server-rounds": 2}, tmp_path, probe=probe)
    assert s.level == "step" and s.spec["aggregator"] == {"rule": "median"}
    assert s.spec["detector"]["batch_size"] == 10
    assert s.spec_sha256 == sf.check_spec({"detector": {"level": "step", "batch_size": 10},
                                           "aggregator": {"rule": "median"}})["spec_sha256"]


@pytest.mark.parametrize(
    "config, key, suggestion",
    [
        ({"safe-fedllm.spec.gate.threshhold": 0.3}, "safe-fedllm.spec.gate.threshhold", "threshold"),
        ({"safe-fedllm.spec.detector.level": "evidnce"}, "safe-fedllm.spec.detector.level", "evidence"),
        ({"safe-fedllm.spec.gate.threshold": 1.5}, "safe-fedllm.spec.gate.threshold", None),
        ({"safe-fedllm.spec-flie": "defense.toml"}, "safe-fedllm.spec-flie", "safe-fedllm.spec-file"),
        ({"safe-fedllm.spec": "defense.toml"}, "safe-fedllm.spec", "safe-fedllm.spec-file"),
        ({"safe-fedllm.spec..threshold": 0.3}, "safe-fedllm.spec..threshold", None),
    ],
)
def test_a_misspelt_or_refused_run_config_key_is_a_spec_error_naming_it(config, key, suggestion):
    with pytest.raises(sf.SpecError) as info:
        spec_from_run_config(config)
    assert info.value.key == key
    if suggestion is not None:
        assert info.value.suggestion == suggestion
    assert key in str(info.value)


def test_a_file_setting_the_new_level_does_not_have_is_named():
    """Changing the level keeps the file's detector settings: the fixture's
    client-level `steepness` is not an evidence-level setting."""
    with pytest.raises(sf.SpecError) as info:
        spec_from_run_config({"safe-fedllm.spec-file": str(SPEC_FILE), "safe-fedllm.spec.detector.level": "evidence"})
    assert info.value.key == "detector.steepness"


def test_the_apps_own_keys_are_ignored_and_a_missing_file_is_an_error(tmp_path):
    spec, spec_dir = spec_from_run_config({"num-server-rounds": 3, "lr": 0.1})
    assert spec == {} and spec_dir is None
    with pytest.raises(sf.SpecError) as info:
        spec_from_run_config({"safe-fedllm.spec-file": str(tmp_path / "missing.toml")})
    assert info.value.key == "safe-fedllm.spec-file"


def test_the_deprecated_keywords_are_the_spec_they_describe(probe, tmp_path):
    with pytest.warns(DeprecationWarning, match="spec="):
        old = SafeFedLLMStrategy(probe, level="step", detector_settings={"batch_size": 10}, rule="krum",
                                 rule_settings={"f": 1}, skip_avg_weight=0.3, trail=0.25,
                                 admission=AdmissionPolicy(samples="cap_at", sample_value=500))
    spec = {"detector": {"level": "step", "batch_size": 10}, "aggregator": {"rule": "krum", "f": 1},
            "gate": {"threshold": 0.3}, "trail": {"max_abs": 0.25},
            "admission": AdmissionPolicy(samples="cap_at", sample_value=500).to_spec()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = SafeFedLLMStrategy(probe, spec=spec)
    assert old.spec_sha256 == new.spec_sha256 and old.level == "step"
    with pytest.raises(TypeError):
        SafeFedLLMStrategy(probe, spec=spec, level="client")
    with pytest.raises(TypeError):
        SafeFedLLMStrategy.from_run_config({}, probe=probe, rule="krum")


def test_a_spec_naming_a_probe_and_another_probe_given_is_refused(probe, tmp_path):
    with pytest.raises(sf.SpecError) as info:
        strategy_from({"safe-fedllm.spec-file": str(SPEC_FILE)}, tmp_path, probe=probe)
    assert info.value.key == "probe"


def test_the_default_admission_policy_is_the_specs_default():
    assert sf.check_spec({"admission": AdmissionPolicy().to_spec()}) == sf.check_spec({})
