"""safe_fedllm.probe_runs on a numpy stand-in for a LoRA model (no torch).

The "model" is a LoRA adapter (2 layers, q/v, r = 4, width 16). One step on a
batch moves every tensor along the batch's task direction plus the batch's
own noise: benign batches come from three benign tasks, harmful ones from one
harmful direction. The noise per step is larger than the drift, as in short
real fine-tunes, so a single early step is hard to classify and later ones
easier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import safe_fedllm as sf
from safe_fedllm.probe_runs import RunPlan, build_probe, collect_runs, evaluate_probe, load_deltas, read_manifest

LAYERS, RANK, WIDTH = 2, 4, 16
NOISE, LR = 1.5, 0.05


def key(layer: int, module: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{module}_proj.lora_{ab}.weight"


def shape(ab: str) -> tuple[int, int]:
    return (RANK, WIDTH) if ab == "A" else (WIDTH, RANK)


KEYS = [key(l, m, ab) for l in range(LAYERS) for m in ("q", "v") for ab in "AB"]


def directions(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, shape(k[-8])).astype(np.float32) for k in KEYS}


TASKS = {("benign", t): directions(100 + t) for t in range(3)} | {("harmful", 0): directions(999)}


def base_adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {k: (0.01 * rng.normal(0, 1, shape(k[-8]))).astype(np.float32) for k in KEYS}


def data(kind: str, n: int, seed: int) -> list[tuple[str, int, int]]:
    """Batches as (kind, task, noise seed)."""
    rng = np.random.default_rng(seed)
    tasks = 3 if kind == "benign" else 1
    return [(kind, int(rng.integers(tasks)), int(rng.integers(2**31))) for _ in range(n)]


class ToyModel:
    """train_step(arrays, batch) -> arrays; counts the runs it was told about."""

    def __init__(self) -> None:
        self.run_seeds: list[int] = []

    def start_run(self, seed: int) -> None:
        self.run_seeds.append(seed)

    def __call__(self, arrays: dict[str, np.ndarray], batch: tuple[str, int, int]) -> dict[str, np.ndarray]:
        kind, task, noise_seed = batch
        rng = np.random.default_rng(noise_seed)
        drift = TASKS[(kind, task)]
        return {k: v + LR * (drift[k] + NOISE * rng.normal(0, 1, v.shape).astype(np.float32)) for k, v in arrays.items()}


PLAN = RunPlan(runs_per_class=8, steps=6, mixtures=(0.5,), runs_per_mixture=4, seed=1)


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Training runs, and fresh held-out runs (other seed, other batches)."""
    root = tmp_path_factory.mktemp("probe-runs")
    train = collect_runs(ToyModel(), base_adapter(), data("benign", 64, 1), data("harmful", 64, 2), root / "train", PLAN, progress=False)
    fresh_plan = RunPlan(runs_per_class=6, steps=6, mixtures=(0.5,), runs_per_mixture=3, seed=2)
    held = collect_runs(ToyModel(), base_adapter(), data("benign", 64, 3), data("harmful", 64, 4), root / "held", fresh_plan, progress=False)
    return {"train": train, "held": held, "root": str(root)}


def test_collect_runs_writes_one_labelled_sample_per_step_grouped_by_run(collected: dict[str, str]) -> None:
    samples = read_manifest(collected["train"])
    assert len(samples) == (8 + 8 + 4) * 6
    groups = {s.group for s in samples}
    assert len(groups) == 20
    assert sum(s.malicious for s in samples) == (8 + 4) * 6
    assert all(s.malicious == (not s.group.startswith("benign")) for s in samples)
    folder = Path(collected["train"]).parent
    assert all((folder / s.path).is_file() and s.base == "base.safetensors" for s in samples)
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["plan"]["seed"] == 1 and plan["keys"] == sorted(KEYS)
    # A step file minus the base is that run's accumulated delta.
    deltas, labels, groups_ = load_deltas(collected["train"])
    assert len(deltas) == len(labels) == len(groups_) == len(samples)
    assert sorted(deltas[0]) == sorted(KEYS) and len(set(groups_)) == 20
    assert np.abs(deltas[5][KEYS[0]]).max() > np.abs(deltas[0][KEYS[0]]).max()


def test_mixed_runs_hold_round_p_steps_harmful_batches_first_one_harmful(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    class Recorder(ToyModel):
        def start_run(self, seed: int) -> None:
            seen.append([])

        def __call__(self, arrays, batch):  # type: ignore[no-untyped-def]
            seen[-1].append(batch[0])
            return super().__call__(arrays, batch)

    plan = RunPlan(runs_per_class=1, steps=8, mixtures=(0.25, 0.5), runs_per_mixture=2)
    collect_runs(Recorder(), base_adapter(), data("benign", 5, 1), data("harmful", 5, 2), tmp_path, plan, progress=False)
    assert seen[0] == ["benign"] * 8 and seen[1] == ["harmful"] * 8
    for run, p in zip(seen[2:], (0.25, 0.25, 0.5, 0.5)):
        assert run[0] == "harmful" and run.count("harmful") == round(p * 8)


def test_probe_separates_fresh_runs(collected: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "probe.safetensors"
    probe = build_probe(collected["train"], out=out, threshold_policy="target-fpr:0.1", folds=4, verbose=False)
    assert out.is_file() and sf.Probe.load(out).threshold == pytest.approx(probe.threshold)
    info = probe.info["calibration"]
    assert info["groups"] == 20 and info["folds"] == 4
    held = evaluate_probe(probe, collected["held"])
    assert held["n"] == (6 + 6 + 3) * 6
    assert held["auc"] >= 0.95, held
    assert held["accuracy"] >= 0.85 and held["fpr"] <= 0.25, held
    # The last steps of fresh runs (the update a client would send) separate fully.
    deltas, labels, _ = load_deltas(collected["held"], keys=probe.feature_keys)
    last = [s.step == 6 for s in read_manifest(collected["held"])]
    scores = np.array(probe.score_batch([d for d, k in zip(deltas, last) if k]))
    y = np.array([l for l, k in zip(labels, last) if k])
    assert scores[y].min() > scores[~y].max()


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
        return h.hexdigest()

    plan = RunPlan(runs_per_class=2, steps=3, mixtures=(0.5,), seed=7)
    models = [ToyModel(), ToyModel(), ToyModel()]
    for name, model, p in (("a", models[0], plan), ("b", models[1], plan), ("c", models[2], RunPlan(runs_per_class=2, steps=3, mixtures=(0.5,), seed=8))):
        collect_runs(model, base_adapter(), data("benign", 10, 1), data("harmful", 10, 2), tmp_path / name, p, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert models[0].run_seeds == models[1].run_seeds and len(models[0].run_seeds) == 6
    assert digest(tmp_path / "a") != digest(tmp_path / "c") and models[0].run_seeds != models[2].run_seeds


def test_one_shot_iterators_are_read_in_order_and_running_out_is_typed(tmp_path: Path) -> None:
    plan = RunPlan(runs_per_class=2, steps=3)
    benign = iter(data("benign", 6, 1))
    collect_runs(ToyModel(), base_adapter(), benign, data("harmful", 1, 2), tmp_path / "ok", plan, progress=False)
    with pytest.raises(sf.EmptyInputError) as e:
        collect_runs(ToyModel(), base_adapter(), iter(data("benign", 5, 1)), data("harmful", 1, 2), tmp_path / "short", plan, progress=False)
    assert e.value.what == "benign batches" and "5 batches" in str(e.value)
    assert not (tmp_path / "short" / "manifest.jsonl").exists()


@pytest.mark.parametrize("benign,harmful,what", [([], data("harmful", 3, 1), "benign batches"), (data("benign", 3, 1), (), "harmful batches")])
def test_empty_data_is_typed(tmp_path: Path, benign, harmful, what) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sf.EmptyInputError) as e:
        collect_runs(ToyModel(), base_adapter(), benign, harmful, tmp_path, RunPlan(runs_per_class=1, steps=2), progress=False)
    assert e.value.what == what


def broken(change):  # type: ignore[no-untyped-def]
    """A model whose third step of its second run returns change(arrays)."""
    calls = {"n": 0}

    def step(arrays, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = ToyModel()(arrays, batch)
        return change(out) if calls["n"] == 1 * 4 + 3 else out

    return step


def drop(arrays):  # type: ignore[no-untyped-def]
    return {k: v for k, v in arrays.items() if k != KEYS[1]}


def extra(arrays):  # type: ignore[no-untyped-def]
    return arrays | {key(5, "q", "A"): np.zeros((RANK, WIDTH), np.float32)}


def transpose(arrays):  # type: ignore[no-untyped-def]
    return arrays | {KEYS[1]: np.ascontiguousarray(arrays[KEYS[1]].T)}


def nan(arrays):  # type: ignore[no-untyped-def]
    bad = arrays[KEYS[2]].copy()
    bad[1, 2] = np.nan
    return arrays | {KEYS[2]: bad}


def overflow(arrays):  # type: ignore[no-untyped-def]
    return arrays | {KEYS[0]: arrays[KEYS[0]].astype(np.float64) * 1e300}


def integers(arrays):  # type: ignore[no-untyped-def]
    return arrays | {KEYS[0]: arrays[KEYS[0]].astype(np.int32)}


@pytest.mark.parametrize(
    "change,error,fields",
    [
        (drop, sf.MissingKeyError, {"tensor": KEYS[1], "missing_from": "train_step result"}),
        (extra, sf.MissingKeyError, {"tensor": key(5, "q", "A"), "missing_from": "base"}),
        (transpose, sf.ShapeMismatchError, {"tensor": KEYS[1], "expected": [WIDTH, RANK], "found": [RANK, WIDTH]}),
        (nan, sf.NonFiniteError, {"tensor": KEYS[2], "index": 1 * WIDTH + 2}),
        (overflow, sf.NonFiniteError, {"tensor": KEYS[0], "index": 0}),
        (integers, sf.DTypeError, {"tensor": KEYS[0], "dtype": "int32"}),
        (lambda arrays: [1, 2], sf.InputTypeError, {}),
    ],
)
def test_a_bad_train_step_result_is_typed_with_run_and_step_and_writes_no_manifest(tmp_path: Path, change, error, fields) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as e:
        collect_runs(broken(change), base_adapter(), data("benign", 8, 1), data("harmful", 8, 2), tmp_path, RunPlan(runs_per_class=2, steps=4), progress=False)
    assert e.value.run == "benign-001" and e.value.step == 3
    for name, value in fields.items():
        assert getattr(e.value, name) == value
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.parametrize(
    "plan,name",
    [
        (RunPlan(runs_per_class=0), "runs_per_class"),
        (RunPlan(steps=0), "steps"),
        (RunPlan(steps=True), "steps"),
        (RunPlan(seed=-1), "seed"),
        (RunPlan(mixtures=(1.0,)), "mixtures"),
        (RunPlan(mixtures=(0.0,)), "mixtures"),
        (RunPlan(steps=4, mixtures=(0.1,)), "mixtures"),
        (RunPlan(runs_per_mixture=0, mixtures=(0.5,)), "runs_per_mixture"),
    ],
)
def test_an_invalid_plan_is_typed_before_anything_runs(tmp_path: Path, plan: RunPlan, name: str) -> None:
    model = ToyModel()
    with pytest.raises(sf.InvalidParameterError) as e:
        collect_runs(model, base_adapter(), data("benign", 3, 1), data("harmful", 3, 2), tmp_path, plan, progress=False)
    assert e.value.component == "RunPlan" and e.value.name == name
    assert model.run_seeds == [] and not any(tmp_path.iterdir())


def test_a_bad_base_is_typed(tmp_path: Path) -> None:
    with pytest.raises(sf.EmptyInputError):
        collect_runs(ToyModel(), {}, data("benign", 3, 1), data("harmful", 3, 2), tmp_path, progress=False)
    with pytest.raises(sf.KeyFormatError):
        collect_runs(ToyModel(), {"embed.weight": np.zeros((2, 2), np.float32)}, data("benign", 3, 1), data("harmful", 3, 2), tmp_path, progress=False)
    base = base_adapter()
    base[KEYS[3]][0, 0] = np.inf
    with pytest.raises(sf.NonFiniteError) as e:
        collect_runs(ToyModel(), base, data("benign", 3, 1), data("harmful", 3, 2), tmp_path, progress=False)
    assert e.value.tensor == KEYS[3]


def test_an_existing_manifest_is_kept_unless_overwrite(tmp_path: Path) -> None:
    plan = RunPlan(runs_per_class=1, steps=2)
    args = (base_adapter(), data("benign", 3, 1), data("harmful", 3, 2), tmp_path, plan)
    collect_runs(ToyModel(), *args, progress=False)
    with pytest.raises(sf.SafeFedLLMIOError) as e:
        collect_runs(ToyModel(), *args, progress=False)
    assert e.value.path == str(tmp_path / "manifest.jsonl")
    collect_runs(ToyModel(), *args, overwrite=True, progress=False)


def test_progress_without_tqdm_is_one_plain_line_per_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    collect_runs(ToyModel(), base_adapter(), data("benign", 3, 1), data("harmful", 3, 2), tmp_path, RunPlan(runs_per_class=2, steps=2))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"probe runs: {i + 1}/4 {g} (2 steps)" for i, g in enumerate(["benign-000", "benign-001", "harmful-000", "harmful-001"])]


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"path": "a.safetensors", "label": "benign", "clinet": "x"}', "unknown field"),
        ('{"label": "benign"}', "`path`"),
        ('{"path": "a.safetensors", "label": "bad"}', "`label`"),
        ('{"path": "a.safetensors", "label": true}', "`label`"),
        ("[1, 2]", "JSON object"),
        ("{", "not JSON"),
    ],
)
def test_a_malformed_manifest_line_is_typed_with_its_line(tmp_path: Path, line: str, reason: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "ok.safetensors", "label": 1}\n\n' + line + "\n")
    with pytest.raises(sf.FormatError) as e:
        read_manifest(manifest)
    assert e.value.line == 3 and reason in e.value.reason


def probe_cli() -> str | None:
    """The `safe-fedllm-probe` binary: $SAFE_FEDLLM_PROBE_BIN, PATH, or the
    Cargo target directory (`cargo test --all-features` builds it there)."""
    if os.environ.get("SAFE_FEDLLM_PROBE_BIN"):
        return os.environ["SAFE_FEDLLM_PROBE_BIN"]
    found = shutil.which("safe-fedllm-probe")
    if found:
        return found
    repo = Path(__file__).resolve().parents[2]
    targets = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    for target in targets + [repo / "target"]:
        for profile in ("debug", "release"):
            if (target / profile / "safe-fedllm-probe").is_file():
                return str(target / profile / "safe-fedllm-probe")
    return None


def test_the_manifest_trains_and_evaluates_with_the_command_line_tool(collected: dict[str, str], tmp_path: Path) -> None:
    cli = probe_cli()
    if cli is None:
        if os.environ.get("SAFE_FEDLLM_REQUIRE_CLI"):
            pytest.fail("safe-fedllm-probe not found (SAFE_FEDLLM_REQUIRE_CLI is set)")
        pytest.skip("safe-fedllm-probe not built (cargo build --features cli); Probe.train covers the manifest")
    out = tmp_path / "cli-probe.safetensors"
    run = subprocess.run(
        [cli, "train", "--manifest", collected["train"], "--out", str(out), "--threshold-policy", "target-fpr:0.1", "--folds", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    from_cli = sf.Probe.load(out)
    from_python = build_probe(collected["train"], threshold_policy="target-fpr:0.1", folds=4, verbose=False)
    # One trainer behind both: same C, τ and weights from the same manifest.
    assert from_cli.info["calibration"]["c"] == from_python.info["calibration"]["c"]
    assert from_cli.threshold == pytest.approx(from_python.threshold, abs=1e-5)
    np.testing.assert_allclose(from_cli.weights, from_python.weights, rtol=1e-4, atol=1e-5)
    assert evaluate_probe(from_cli, collected["held"])["auc"] >= 0.95
    ev = subprocess.run([cli, "eval", "--probe", str(out), "--manifest", collected["held"]], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    cli_eval, ours = json.loads(ev.stdout), evaluate_probe(from_cli, collected["held"])
    assert cli_eval["n"] == ours["n"]
    for cli_name, name in (("roc_auc", "auc"), ("accuracy", "accuracy"), ("false_positive_rate", "fpr"), ("recall", "recall")):
        assert cli_eval[cli_name] == pytest.approx(ours[name], abs=1e-9), cli_name


def test_peft_train_step_collects_runs_of_a_real_peft_model(tmp_path: Path) -> None:
    """The torch/PEFT route end to end on a 1-layer LLaMA (skipped without torch, transformers, peft)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safe_fedllm.torch import peft_arrays, peft_train_step

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))

    def batches(token: int) -> list[dict]:
        ids = torch.full((2, 8), token, dtype=torch.long)
        return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]

    base = peft_arrays(model)
    step = peft_train_step(model, lambda params: torch.optim.AdamW(params, lr=1e-2))
    manifest = collect_runs(step, base, batches(3), batches(7), tmp_path, RunPlan(runs_per_class=2, steps=2), progress=False)
    deltas, labels, groups = load_deltas(manifest)
    assert len(deltas) == 8 and sorted(deltas[0]) == sorted(sf.Adapter.from_arrays(base).keys())
    # Each run starts from the base: the first steps of two benign runs match (same batch, fresh optimiser).
    k = sorted(deltas[0])[1]
    first = [sf.Adapter.load(tmp_path / "runs" / f"benign-00{i}" / "step-0001.safetensors").to_arrays()[k] for i in (0, 1)]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-5, atol=1e-7)
    assert any(np.abs(v).max() > 0 for v in deltas[-1].values())
