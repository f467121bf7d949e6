"""Unit tests of the bindings: every exposed type, and an error path for each
(wrong dtype, non-contiguous array, missing key, NaN)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import safe_fedllm as sf
from conftest import KEY, client_update, keys

QB0 = KEY.format(layer=0, module="q", factor="B")


def with_(arrays, key, value):
    out = dict(arrays)
    out[key] = value
    return out


def without(arrays, key):
    return {k: v for k, v in arrays.items() if k != key}


def nan_at(arrays, key):
    bad = arrays[key].copy()
    bad.flat[3] = np.nan
    return with_(arrays, key, bad)


# -- the four input errors, on every entry point that reads arrays ------------

def entry_points(probe, global_arrays):
    spec = probe.spec
    return {
        "Adapter.from_arrays": lambda a: sf.Adapter.from_arrays(a),
        "delta": lambda a: sf.delta(a, global_arrays),
        "FeatureSpec.transform": lambda a: spec.transform(a),
        "Probe.score": lambda a: probe.score(a),
        "Probe.score_update": lambda a: probe.score_update(a, global_arrays),
        "Aggregator.aggregate": lambda a: sf.Aggregator("fedavg").aggregate(global_arrays, [("c", a, 10, 1.0)]),
        # The server's own global is checked strictly; a client's update is
        # refused instead (test_round_refuses_unreadable_client_updates).
        "DefendedRound.run": lambda a: sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg")).run(
            0, a, [{"client": "c", "update": global_arrays, "samples": 10}]),
        "FeatureSpec.fit": lambda a: sf.FeatureSpec.fit([a]),
        "Probe.train": lambda a: sf.Probe.train([a, global_arrays], [True, False]),
    }


ENTRY_POINTS = ["Adapter.from_arrays", "delta", "FeatureSpec.transform", "Probe.score", "Probe.score_update",
                "Aggregator.aggregate", "DefendedRound.run", "FeatureSpec.fit", "Probe.train"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_float64_is_a_typed_dtype_error(name, probe, global_arrays):
    call = entry_points(probe, global_arrays)[name]
    bad = with_(global_arrays, QB0, global_arrays[QB0].astype(np.float64))
    with pytest.raises(sf.DTypeError) as info:
        call(bad)
    assert info.value.tensor == QB0
    assert info.value.dtype == "float64"
    assert isinstance(info.value, TypeError) and isinstance(info.value, sf.SafeFedLLMError)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_non_contiguous_is_rejected_not_read_transposed(name, probe, global_arrays):
    call = entry_points(probe, global_arrays)[name]
    fortran = np.asfortranarray(global_arrays[QB0])  # same shape and values, F order
    with pytest.raises(sf.NotContiguousError) as info:
        call(with_(global_arrays, QB0, fortran))
    assert info.value.tensor == QB0
    strided = np.zeros((global_arrays[QB0].shape[0], 2 * global_arrays[QB0].shape[1]), np.float32)[:, ::2]
    with pytest.raises(sf.NotContiguousError):
        call(with_(global_arrays, QB0, strided))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_non_2d_is_a_shape_error(name, probe, global_arrays):
    call = entry_points(probe, global_arrays)[name]
    with pytest.raises(sf.ShapeMismatchError) as info:
        call(with_(global_arrays, QB0, global_arrays[QB0].reshape(-1)))
    assert info.value.tensor == QB0
    assert info.value.kind == "not_a_matrix"


def _refused_round(probe, global_arrays, rng, bad_report):
    """Four benign clients and one bad report through DefendedRound.run."""
    rnd = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"), skip_avg_weight=0.2)
    benign = [client_update(global_arrays, rng, False) for _ in range(4)]
    reports = [{"client": f"b{i}", "update": u, "samples": 10} for i, u in enumerate(benign)]
    out = rnd.run(0, global_arrays, reports + [{"client": "bad", **bad_report}])
    return out, benign


@pytest.mark.parametrize("attack", ["float64", "fortran", "strided", "one_d", "not_lora", "negative_samples",
                                    "float_samples", "no_samples", "no_update", "bad_steps", "refused"])
def test_round_refuses_unreadable_client_updates(attack, probe, global_arrays, rng):
    update = dict(client_update(global_arrays, rng, False))
    report: dict = {"update": update, "samples": 10}
    if attack == "float64":
        update[QB0] = update[QB0].astype(np.float64)
    elif attack == "fortran":
        update[QB0] = np.asfortranarray(update[QB0])
    elif attack == "strided":
        update[QB0] = np.zeros((update[QB0].shape[0], 2 * update[QB0].shape[1]), np.float32)[:, ::2]
    elif attack == "one_d":
        update[QB0] = update[QB0].reshape(-1)
    elif attack == "not_lora":
        update["model.embed_tokens.weight"] = np.zeros((2, 2), np.float32)
    elif attack == "negative_samples":
        report["samples"] = -3
    elif attack == "float_samples":
        report["samples"] = 2.5
    elif attack == "no_samples":
        del report["samples"]
    elif attack == "no_update":
        del report["update"]
    elif attack == "bad_steps":
        report["steps"] = [{QB0: update[QB0].astype(np.float64)}]
    elif attack == "refused":
        report = {"refused": ("dropped", "no reply")}
    out, benign = _refused_round(probe, global_arrays, rng, report)
    bad = next(c for c in out["clients"] if c["client"] == "bad")
    # Rejected by the round's own admission stage: factor 0, not aggregated,
    # counted in the gate's mean (5 reports, 4 factors of about 1).
    assert bad["admission"]["status"] == "rejected" and bad["admission"]["reason"] == "unreadable"
    assert bad["disposition"] == "rejected" and bad["factor"] == 0.0 and bad["aggregation_weight"] is None
    assert "reply" in bad["admission"]["error"]
    assert out["mean_factor"] <= 4 / 5 + 1e-9 and not out["skipped"]
    mean = {k: np.mean([u[k] for u in benign], axis=0) for k in global_arrays}
    for k in global_arrays:
        assert np.abs(out["new_global"][k] - mean[k]).max() < 5e-3  # factor-weighted benign mean
    if attack == "refused":
        assert "dropped" in bad["admission"]["error"] and "no reply" in bad["admission"]["error"]


def test_refused_reports_count_zero_in_the_gate(probe, global_arrays, rng):
    rnd = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"), skip_avg_weight=0.2)
    refused = [{"client": f"r{i}", "refused": "float64"} for i in range(5)]
    reports = [{"client": "ok", "update": client_update(global_arrays, rng, False), "samples": 10},
               {"client": "evil", "update": client_update(global_arrays, rng, True), "samples": 10}]
    out = rnd.run(0, global_arrays, refused + reports)
    assert out["mean_factor"] < 0.2 and out["skipped"] and out["new_global"] is None


def test_missing_key_errors_name_the_key(probe, global_arrays, rng):
    update = client_update(global_arrays, rng, False)
    with pytest.raises(sf.MissingKeyError) as info:
        sf.delta(without(update, QB0), global_arrays)
    assert info.value.tensor == QB0 and info.value.missing_from == "the update"
    with pytest.raises(sf.MissingKeyError) as info:
        probe.score_update(without(update, QB0), global_arrays)
    assert info.value.tensor == QB0
    with pytest.raises(sf.MissingKeyError) as info:
        sf.Aggregator("fedavg").aggregate(global_arrays, [("c7", without(update, QB0), 10, 1.0)])
    assert info.value.client == "c7" and info.value.tensor == QB0
    with pytest.raises(sf.MissingKeyError) as info:
        probe.score_update(update, without(global_arrays, QB0))
    assert info.value.tensor == QB0 and info.value.missing_from == "the base adapter"
    # In a defended round a client's missing key is a typed rejection, not an error for everyone.
    rnd = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"))
    reports = [{"client": f"b{i}", "update": client_update(global_arrays, rng, False), "samples": 10} for i in range(3)]
    out = rnd.run(0, global_arrays, reports + [{"client": "m", "update": without(update, QB0), "samples": 10}])
    m = {c["client"]: c for c in out["clients"]}["m"]
    assert m["admission"]["status"] == "rejected" and m["admission"]["reason"] == "key_mismatch"
    assert QB0 in m["admission"]["missing"] and m["factor"] == 0.0


def test_nan_errors_and_exclusions(probe, global_arrays, rng):
    update = client_update(global_arrays, rng, False)
    bad = nan_at(update, QB0)
    with pytest.raises(sf.NonFiniteError) as info:
        sf.Adapter.from_arrays(bad).check_finite()
    assert info.value.tensor == QB0 and info.value.index == 3
    with pytest.raises(sf.NonFiniteError):
        probe.score_update(bad, global_arrays)  # a feature tensor: never reaches the classifier
    # Aggregation excludes the NaN client and the global does not move toward it.
    out = sf.Aggregator("fedavg").aggregate(global_arrays, [("good", update, 10, 1.0), ("bad", bad, 10, 1.0)])
    assert [e["client"] for e in out["exclusions"]] == ["bad"]
    for k in global_arrays:
        np.testing.assert_allclose(out["new_global"][k], update[k], rtol=1e-6)


def test_not_a_lora_key_and_wrong_type(global_arrays):
    with pytest.raises(sf.KeyFormatError) as info:
        sf.Adapter.from_arrays(with_(global_arrays, "model.embed_tokens.weight", np.zeros((2, 2), np.float32)))
    assert info.value.key == "model.embed_tokens.weight"
    with pytest.raises(sf.InputTypeError):
        sf.Adapter.from_arrays([1, 2, 3])
    with pytest.raises(sf.DTypeError):
        sf.Adapter.from_arrays({QB0: [[1.0, 2.0]]})


# -- Adapter, delta, canonical_key -------------------------------------------

def test_adapter_round_trip_and_delta(tmp_path, global_arrays, rng):
    update = client_update(global_arrays, rng, False)
    a = sf.Adapter.from_arrays(update)
    assert len(a) == len(update) and a.rank == 4 and QB0 in a
    assert a.shapes()[QB0] == update[QB0].shape
    path = tmp_path / "adapter_model.safetensors"
    a.save(str(path))
    b = sf.Adapter.load(str(path))
    for k, v in b.to_arrays().items():
        np.testing.assert_array_equal(v, update[k])
    d = sf.delta(b, global_arrays)
    np.testing.assert_allclose(d.to_arrays()[QB0], update[QB0] - global_arrays[QB0], atol=1e-7)
    with pytest.raises(sf.SafeFedLLMIOError) as info:
        sf.Adapter.load(str(tmp_path / "missing.safetensors"))
    assert info.value.path.endswith("missing.safetensors")
    with pytest.raises(sf.InvalidParameterError):
        a.save(str(path), dtype="int8")
    # A directory (or a FIFO, a device) is refused before it is opened.
    with pytest.raises(sf.SafeFedLLMIOError) as info:
        sf.Adapter.load(str(tmp_path))
    assert info.value.kind == "not_a_file" and info.value.file_kind == "directory"
    assert info.value.path == str(tmp_path)


def test_canonical_key_drops_the_adapter_name():
    raw = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert sf.canonical_key(raw) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert sf.canonical_key("lm_head.weight") is None


def test_peft_spellings_are_read_zero_copy_under_any_name(probe, global_arrays, rng):
    update = client_update(global_arrays, rng, True)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in update.items()}
    assert probe.score(sf.delta(renamed, global_arrays)) == pytest.approx(probe.score(sf.delta(update, global_arrays)))


# -- FeatureSpec and Probe ----------------------------------------------------

def test_feature_spec_fit_transform_json(global_arrays, rng):
    deltas = [sf.delta(client_update(global_arrays, rng, False), global_arrays) for _ in range(3)]
    spec = sf.FeatureSpec.fit(deltas)  # first_layer_b: layer-0 lora_B of q and v
    assert spec.keys == sorted(k for k in keys() if "layers.0" in k and "lora_B" in k)
    x = spec.transform(deltas[0])
    assert x.shape == (spec.dim,) and x.dtype == np.float32
    assert np.linalg.norm(x) == pytest.approx(1.0, rel=1e-5)
    assert sf.FeatureSpec.from_json(spec.to_json()).keys == spec.keys
    every = sf.FeatureSpec.fit(deltas, selection="all_layers", normalization="none")
    assert every.dim == sum(v.size for v in global_arrays.values())
    with pytest.raises(sf.InvalidParameterError):
        sf.FeatureSpec.fit(deltas, normalization="l3")
    with pytest.raises(sf.CheckpointError):
        sf.FeatureSpec.from_json("{")


def test_probe_separates_and_round_trips(tmp_path, probe, global_arrays, rng):
    mal = [probe.score_update(client_update(global_arrays, rng, True), global_arrays) for _ in range(10)]
    ben = [probe.score_update(client_update(global_arrays, rng, False), global_arrays) for _ in range(10)]
    assert min(mal) > max(ben)
    path = tmp_path / "probe.safetensors"
    probe.save(str(path))
    again = sf.Probe.load(str(path))
    u = client_update(global_arrays, rng, True)
    assert again.score_update(u, global_arrays) == probe.score_update(u, global_arrays)
    assert sf.Probe.from_bytes(probe.to_bytes()).threshold == probe.threshold
    assert probe.features(sf.delta(u, global_arrays)).shape == (probe.spec.dim,)
    assert probe.score_batch([sf.delta(u, global_arrays)])[0] == pytest.approx(probe.score_update(u, global_arrays))
    assert probe.info["training"]["samples"] == 60
    manual = sf.Probe.from_weights(probe.spec, probe.weights, probe.bias, threshold=0.7)
    assert manual.threshold == pytest.approx(0.7)
    assert manual.is_harmful(0.71) and not manual.is_harmful(0.69)
    with pytest.raises(sf.InvalidParameterError):
        probe.with_threshold(1.5)


def test_probe_training_with_calibration_and_errors(global_arrays, rng):
    deltas = [sf.delta(client_update(global_arrays, rng, m), global_arrays) for m in [False] * 12 + [True] * 12]
    labels = ["benign"] * 12 + ["malicious"] * 12
    held_out = [sf.delta(client_update(global_arrays, rng, m), global_arrays) for m in [False] * 6 + [True] * 6]
    p = sf.Probe.train(deltas, labels, c=10.0, calibrate=0.0, calibration=(held_out, [False] * 6 + [True] * 6))
    scores = p.score_batch(held_out)
    assert all(s < p.threshold for s in scores[:6])  # FPR 0 on the calibration set
    with pytest.raises(sf.TrainingError):
        sf.Probe.train(deltas[:12], labels[:12])
    with pytest.raises(sf.ShapeMismatchError):
        sf.Probe.train(deltas, labels[:-1])
    with pytest.raises(sf.InvalidParameterError):
        sf.Probe.train(deltas, labels, c=-1.0)


def test_calibrated_training_chooses_c_and_threshold(global_arrays, rng):
    deltas = [sf.delta(client_update(global_arrays, rng, m), global_arrays) for m in [False] * 15 + [True] * 15]
    labels = [False] * 15 + [True] * 15
    p = sf.Probe.train(deltas, labels, calibrated=True, c_grid=[0.1, 10.0], folds=3, threshold_policy="target-fpr:0.0")
    info = p.info
    assert info["calibration"]["c"] in (0.1, 10.0) and info["calibration"]["folds"] == 3
    scores = p.score_batch(deltas)
    assert all(s < p.threshold for s in scores[:15])
    grouped = sf.Probe.train(deltas, labels, calibrated=True, folds=3, groups=[i // 2 for i in range(30)])
    assert grouped.threshold == pytest.approx(0.8)  # the default policy: fixed 0.8
    with pytest.raises(sf.InvalidParameterError):
        sf.Probe.train(deltas, labels, calibrated=True, threshold_policy="fixed:2")
    with pytest.raises(sf.InvalidParameterError):
        sf.Probe.train(deltas, labels, calibrated=True, folds=1)


def test_probe_train_defaults_to_the_calibrated_trainer(global_arrays, rng):
    deltas = [sf.delta(client_update(global_arrays, rng, m), global_arrays) for m in [False] * 15 + [True] * 15]
    labels = [False] * 15 + [True] * 15
    default = sf.Probe.train(deltas, labels)
    # The core's recommended trainer: C from its grid by k-fold, τ by its
    # default policy (fixed at the core's τ), with the calibration report.
    assert "calibration" in default.info
    assert default.info["calibration"]["folds"] == 5
    assert default.threshold == pytest.approx(sf.Probe.from_weights(default.spec, default.weights, default.bias).threshold)
    plain = sf.Probe.train(deltas, labels, calibrated=False)
    assert "calibration" not in plain.info
    # A given `c` is the calibrated trainer's one-value grid.
    assert sf.Probe.train(deltas, labels, c=10.0, folds=3).info["calibration"]["c"] == 10.0


def test_heavy_work_releases_the_gil(probe, global_arrays):
    big_key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    big = {big_key: np.ones((64, 400_000), np.float32)}
    base = {big_key: np.zeros((64, 400_000), np.float32)}
    ticks = 0
    stop = False

    def spin():
        nonlocal ticks
        while not stop:
            ticks += 1
            time.sleep(0)

    t = threading.Thread(target=spin)
    t.start()
    try:
        for _ in range(3):
            sf.delta(big, base)
    finally:
        stop = True
        t.join()
    assert ticks > 10


# -- Detector -----------------------------------------------------------------

@pytest.mark.parametrize("level", ["step", "client", "shadow", "evidence"])
def test_every_level_assesses_and_checkpoints(level):
    d = sf.Detector(level)
    assert d.level == level
    kwargs = {
        "step": dict(steps=[0.9] * 10),
        "client": dict(last_score=0.99),
        "shadow": dict(shadow_steps=[0.95] * 10),
        "evidence": dict(shadow_steps=[0.95] * 10),
    }[level]
    a = d.assess(0, "evil", 160, **kwargs)
    assert a["verdict"] == "malicious" and a["factor"] < 0.1
    resumed = sf.Detector.from_json(d.to_json())
    b1 = d.assess(1, "evil", 160, **kwargs)
    b2 = resumed.assess(1, "evil", 160, **kwargs)
    assert b1 == b2
    with pytest.raises(sf.InvalidEvidenceError) as info:
        d.assess(2, "evil", 160, steps=[float("nan")], last_score=float("nan"), shadow_steps=[float("nan")])
    assert info.value.client == "evil" and info.value.round == 2


def test_detector_settings_are_validated():
    d = sf.Detector("client", active_rounds=None, missing_score="benign")
    # τ is the probe's, given with the scores: the same score flips verdict with it.
    assert d.assess(0, "a", 16, last_score=0.85, threshold=0.9)["verdict"] == "benign"
    assert d.assess(1, "a", 16, last_score=0.85, threshold=0.8)["verdict"] == "malicious"
    assert sf.Detector("evidence", evidence_min=2, shadow={"eta": 3.0}).level == "evidence"
    # the settings are the spec's `detector` section
    assert sf.Detector("step", decay=0.9).settings["decay"] == 0.9
    with pytest.raises(sf.SpecError) as info:
        sf.Detector("step", threshold=0.5)  # not a level setting: the probe carries τ
    assert info.value.key == "detector.threshold"
    with pytest.raises(sf.SpecError) as info:
        sf.Detector("evidence", eta=3.0)  # a shadow setting: under shadow={...}, as in a spec
    assert info.value.key == "detector.eta"
    with pytest.raises(sf.InvalidEvidenceError):
        d.assess(2, "a", 16, last_score=0.5, threshold=1.5)
    with pytest.raises(sf.InvalidParameterError) as info:
        sf.Detector("step", decay=1.5)
    assert info.value.name == "decay"
    with pytest.raises(sf.SpecError):
        sf.Detector("client", eta=7.0)  # not a client-level setting
    with pytest.raises(sf.SpecError) as info:
        sf.Detector("evidnce")
    assert info.value.key == "detector.level" and info.value.suggestion == "evidence"
    with pytest.raises(sf.CheckpointError):
        sf.Detector.from_json('{"level": "client", "params": 3}')
    assert sf.Detector("shadow").needs_shadow("a") and not sf.Detector("client").needs_shadow("a")


# -- Aggregator ----------------------------------------------------------------

RULES = [
    ("fedavg", {}),
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("krum", {"f": 1}),
    ("multi_krum", {"f": 1, "m": 3}),
    ("bulyan", {"f": 1}),
    ("geometric_median", {}),
    ("norm_clipping", {"bound": "median_norm"}),
    ("foolsgold", {"weighting": "samples_times_factor"}),  # a sybil defence: the factor removes the outlier
    ("flame", {"seed": 1}),
    ("dnc", {"f": 1, "seed": 1}),
]


@pytest.mark.parametrize("rule,settings", RULES)
def test_every_rule_aggregates_and_resists_an_outlier(rule, settings, global_arrays, rng):
    benign = [client_update(global_arrays, rng, False) for _ in range(7)]
    evil = {k: v + 50.0 for k, v in global_arrays.items()}
    agg = sf.Aggregator(rule, **settings)
    assert agg.name.startswith(rule.split("_")[0][:4]) or agg.name
    updates = [(f"b{i}", u, 100, 1.0) for i, u in enumerate(benign)] + [("evil", evil, 100, 0.0)]
    out = agg.aggregate(global_arrays, updates)
    assert not out["skipped"]
    mean = {k: np.mean([u[k] for u in benign], axis=0) for k in global_arrays}
    for k in global_arrays:
        assert np.abs(out["new_global"][k] - mean[k]).max() < 1.0, rule
    assert "evil" not in {c["client"] for c in out["contributions"] if c["weight"] > 0.2}


def test_rule_errors_are_typed(global_arrays, rng):
    with pytest.raises(sf.InvalidParameterError) as info:
        sf.Aggregator("krum", f=-1)
    with pytest.raises(sf.InvalidParameterError) as info:
        sf.Aggregator("trimmed_mean", beta=0.7)
    assert info.value.name == "beta" and info.value.component == "trimmed_mean"
    assert info.value.kind == "invalid_parameter"
    with pytest.raises(sf.SpecError) as info:
        sf.Aggregator("krumm", f=1)
    assert info.value.key == "aggregator.rule" and info.value.suggestion == "krum"
    with pytest.raises(sf.SpecError) as info:
        sf.Aggregator("multi_krum", f=1, mm=3)
    assert info.value.key == "aggregator.mm" and info.value.suggestion == "m"
    with pytest.raises(sf.SpecError) as info:
        sf.Aggregator("fedavg", weighting="by_samples")
    # serde reads a tagged section whole: the key stops at the section, the reason names the value
    assert info.value.key.startswith("aggregator") and "by_samples" in info.value.reason
    few = [(str(i), client_update(global_arrays, rng, False), 10) for i in range(3)]
    with pytest.raises(sf.TooFewClientsError) as info:
        sf.Aggregator("krum", f=1).aggregate(global_arrays, few)
    assert info.value.found == 3
    with pytest.raises(sf.DuplicateClientError) as info:
        sf.Aggregator("fedavg").aggregate(global_arrays, [few[0], few[0]])
    assert info.value.client == "0"
    with pytest.raises(sf.InvalidEvidenceError):
        sf.Aggregator("fedavg").aggregate(global_arrays, [("a", few[0][1], 10, 1.5)])
    shape_bad = dict(few[0][1])
    shape_bad[QB0] = np.zeros((3, 3), np.float32)
    with pytest.raises(sf.ShapeMismatchError) as info:
        sf.Aggregator("fedavg").aggregate(global_arrays, [("a", shape_bad, 10)])
    assert info.value.client == "a" and info.value.tensor == QB0
    assert info.value.kind == "shape_mismatch" and info.value.found == [3, 3]
    missing = dict(few[0][1])
    del missing[QB0]
    with pytest.raises(sf.MissingKeyError) as info:
        sf.Aggregator("fedavg").aggregate(global_arrays, [("b", missing, 10)])
    assert info.value.client == "b" and info.value.tensor == QB0
    assert info.value.missing_from == "the client's update"


def test_factor_gate_and_safety_gate(global_arrays, rng):
    ups = [(str(i), client_update(global_arrays, rng, False), 10, 0.05) for i in range(5)]
    assert not sf.Aggregator("fedavg").aggregate(global_arrays, ups)["skipped"]  # no gate by default
    out = sf.Aggregator("fedavg", skip_avg_weight=0.2).aggregate(global_arrays, ups)
    assert out["skipped"] and out["new_global"] is None
    gated = sf.Aggregator("median", gate=0.5)
    ups = [(str(i), client_update(global_arrays, rng, False), 10, 1.0 if i < 3 else 0.0) for i in range(5)]
    out = gated.aggregate(global_arrays, ups)
    assert {e["client"] for e in out["exclusions"]} == {"3", "4"}


# -- DefendedRound ----------------------------------------------------------------

def test_defended_round_zeroes_malicious_clients_and_checkpoints(probe, global_arrays, rng):
    rnd = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"))
    benign = [client_update(global_arrays, rng, False) for _ in range(4)]
    evil = [client_update(global_arrays, rng, True) for _ in range(2)]
    reports = [{"client": f"b{i}", "update": u, "samples": 100} for i, u in enumerate(benign)]
    reports += [{"client": f"m{i}", "update": u, "samples": 100} for i, u in enumerate(evil)]
    reports.append({"client": "nan", "update": nan_at(benign[0], QB0), "samples": 100})
    out = rnd.run(0, global_arrays, reports)
    by = {c["client"]: c for c in out["clients"]}
    assert by["m0"]["factor"] < 0.05 and by["m0"]["verdict"] == "malicious"
    # Round 0: every client is new, on probation at ≤ 0.5; benign ones get all of it.
    assert by["b0"]["factor"] == pytest.approx(0.5)
    assert by["nan"]["disposition"] == "rejected" and by["nan"]["factor"] == 0.0
    mean = {k: np.mean([u[k] for u in benign], axis=0) for k in global_arrays}
    for k in global_arrays:
        assert np.abs(out["new_global"][k] - mean[k]).max() < 0.02
    assert json.loads(out["audit_line"])["round"] == 0
    state = rnd.detector_json()
    again = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"))
    again.load_detector_json(state)
    assert again.detector.to_json() == state
    with pytest.raises(sf.CheckpointError):
        sf.DefendedRound(probe, sf.Detector("step"), sf.Aggregator("fedavg")).load_detector_json(state)


def test_defended_round_step_trail_is_checked(probe, global_arrays, rng):
    rnd = sf.DefendedRound(probe, sf.Detector("step", batch_size=10), sf.Aggregator("fedavg"), skip_avg_weight=0.0)
    u = client_update(global_arrays, rng, False)
    steps = [{k: (global_arrays[k] + (u[k] - global_arrays[k]) * (i + 1) / 3).astype(np.float32) for k in u} for i in range(3)]
    steps[-1] = u
    liar_steps = [dict(s) for s in steps]
    liar = client_update(global_arrays, rng, True)
    out = rnd.run(0, global_arrays, [
        {"client": "honest", "update": u, "samples": 30, "steps": steps},
        {"client": "liar", "update": liar, "samples": 30, "steps": liar_steps},
        {"client": "scores", "update": u, "samples": 30, "steps": [0.1, 0.2, 0.1]},
    ])
    by = {c["client"]: c for c in out["clients"]}
    assert by["honest"]["trail"]["status"] == "verified"
    assert by["liar"]["trail"]["status"] == "mismatch" and by["liar"]["factor"] == 0.0
    assert by["scores"]["trail"]["status"] == "not_checked"


def test_defended_round_admission_policy(probe, global_arrays, rng):
    benign = [client_update(global_arrays, rng, False) for _ in range(4)]
    huge = {k: v + 100.0 for k, v in benign[0].items()}
    reports = [{"client": f"b{i}", "update": u, "samples": 100} for i, u in enumerate(benign)]
    reports.append({"client": "liar", "update": benign[1], "samples": 10**15})
    reports.append({"client": "huge", "update": huge, "samples": 100})
    rnd = sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"),
                           admission={"samples": {"policy": "cap_at", "value": 100},
                                      "norm_bound": {"bound": "absolute", "value": 5.0}, "over_bound": "exclude"})
    out = rnd.run(0, global_arrays, reports)
    by = {c["client"]: c for c in out["clients"]}
    assert by["liar"]["samples"] == 100 and by["liar"]["declared_samples"] == 10**15
    assert by["huge"]["admission"]["status"] == "rejected" and by["huge"]["factor"] == 0.0
    # self-reported scores are refused unless accepted explicitly
    scored = [{"client": "s", "update": benign[0], "samples": 100, "steps": [0.0, 0.0]}] + reports[:3]
    step_round = sf.DefendedRound(probe, sf.Detector("step"), sf.Aggregator("fedavg"))
    assert {c["client"]: c["disposition"] for c in step_round.run(0, global_arrays, scored)["clients"]}["s"] == "rejected"
    trusting = sf.DefendedRound(probe, sf.Detector("step"), sf.Aggregator("fedavg"), accept_self_reported=True)
    s = {c["client"]: c for c in trusting.run(0, global_arrays, scored)["clients"]}["s"]
    assert s["step_evidence"] == "self_reported"
    assert sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"), admission="reference").level == "client"
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"),
                         admission={"samples": {"policy": "cap_at_median_multiple", "value": 0.5}})
    assert info.value.key == "admission.samples"
    with pytest.raises(sf.SpecError) as info:
        sf.DefendedRound(probe, sf.Detector("client"), sf.Aggregator("fedavg"), admission={"require_probe_key": False})
    assert info.value.key == "admission.require_probe_key" and info.value.suggestion == "require_probe_keys"


def test_set_num_threads_sizes_the_pool_once():
    # A fresh interpreter: this test process has already started the pool.
    import subprocess
    import sys

    script = """
import numpy as np
import safe_fedllm as sf
try:
    sf.set_num_threads(0)
except sf.InvalidParameterError as e:
    assert e.name == "num_threads"
else:
    raise AssertionError("0 threads accepted")
sf.set_num_threads(1)
try:
    sf.set_num_threads(2)
except sf.ThreadPoolError as e:
    assert e.kind == "thread_pool"
else:
    raise AssertionError("the pool was sized twice")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
