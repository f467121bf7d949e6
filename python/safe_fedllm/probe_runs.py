"""Build a probe for your own base model: collect labelled LoRA runs, then train.

A probe tells a benign ΔLoRA from a harmful one. It must be trained on runs of
*your* base model and adapter layout: short fine-tunes from the federation's
starting adapter on benign data like your clients', and on harmful data
(optionally benign batches mixed with a fraction ``p`` of harmful ones). This
module runs them through your own training callback and writes what the
command-line tool and :meth:`Probe.train` read::

    from safe_fedllm.probe_runs import RunPlan, collect_runs, build_probe

    def train_step(arrays, batch):          # {PEFT key: float32 array} -> same
        ...                                 # one optimiser step on `batch`
        return new_arrays

    collect_runs(train_step, base, benign_batches, harmful_batches, "probe-runs",
                 RunPlan(runs_per_class=16, steps=20, mixtures=(0.25, 0.5)))
    probe = build_probe("probe-runs/manifest.jsonl", out="probe.safetensors",
                        threshold_policy="target-fpr:0.05")

or ``safe-fedllm-probe train --manifest probe-runs/manifest.jsonl --out
probe.safetensors --threshold-policy target-fpr:0.05``. With torch and PEFT,
:func:`safe_fedllm.torch.peft_train_step` makes ``train_step`` from a model
and an optimiser. The guide: ``docs/building-a-probe.md``.

Each run starts from ``base``; every step's adapter is saved
(``runs/<group>/step-NNNN.safetensors``), and every saved step is one sample
labelled with its run's class, grouped by run so cross-validation never
splits a run. ``plan.json`` beside the manifest records the plan and seed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._manifest import Sample, checked_arrays, load_deltas, read_manifest, write_manifest
from ._native import Adapter, FeatureSpec, Probe
from .errors import EmptyInputError, InvalidParameterError, SafeFedLLMIOError

__all__ = ["RunPlan", "Run", "collect_runs", "build_probe", "evaluate_probe", "load_deltas", "read_manifest"]

TrainStep = Callable[[dict[str, np.ndarray], Any], Mapping[str, np.ndarray]]
MANIFEST = "manifest.jsonl"


def _invalid(name: str, value: Any, expected: str) -> InvalidParameterError:
    return InvalidParameterError(
        f"RunPlan.{name} = {value!r}: expected {expected}",
        kind="invalid_parameter", component="RunPlan", name=name, value=value, expected=expected,
    )


@dataclass(frozen=True)
class RunPlan:
    """Which runs to collect. ``check()`` validates; :func:`collect_runs` calls it.

    * ``runs_per_class``: benign runs, and as many harmful runs;
    * ``steps``: optimiser steps per run (each step's adapter is a sample);
    * ``mixtures``: fractions ``p`` in (0, 1): per ``p``, ``runs_per_mixture``
      runs (default ``runs_per_class``) whose batches are ``round(p·steps)``
      harmful, the rest benign, labelled malicious. The first batch of a
      mixed run is harmful, so every saved step has seen harmful data;
    * ``seed``: batch order, mixture positions and the seed handed to
      ``train_step.start_run``: the same plan and data give the same files.
    """

    runs_per_class: int = 8
    steps: int = 10
    mixtures: tuple[float, ...] = ()
    runs_per_mixture: int | None = None
    seed: int = 0

    def check(self) -> "RunPlan":
        """Returns the plan if every setting is in range, else :class:`InvalidParameterError`."""
        for name in ("runs_per_class", "steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise _invalid(name, value, "an integer ≥ 0" if name == "seed" else "an integer ≥ 1")
        if self.runs_per_mixture is not None and (
            isinstance(self.runs_per_mixture, bool) or not isinstance(self.runs_per_mixture, int) or self.runs_per_mixture < 1
        ):
            raise _invalid("runs_per_mixture", self.runs_per_mixture, "None or an integer ≥ 1")
        for p in self.mixtures:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
                raise _invalid("mixtures", p, "fractions strictly between 0 and 1")
            if round(p * self.steps) < 1:
                raise _invalid("mixtures", p, f"p·steps ≥ 0.5 (steps = {self.steps}: a run with no harmful batch)")
        return self

    def runs(self) -> list["Run"]:
        """Every run of the plan, in collection order."""
        self.check()
        out = [Run(f"benign-{i:03d}", 0.0, False) for i in range(self.runs_per_class)]
        out += [Run(f"harmful-{i:03d}", 1.0, True) for i in range(self.runs_per_class)]
        per_mix = self.runs_per_class if self.runs_per_mixture is None else self.runs_per_mixture
        for p in self.mixtures:
            out += [Run(f"mix{p:g}-{i:03d}", float(p), True) for i in range(per_mix)]
        return out


@dataclass(frozen=True)
class Run:
    """One run: its group name, the fraction of harmful batches, its label."""

    group: str
    harmful_fraction: float
    malicious: bool


class _Batches:
    """Draws batches from a user's data: a Sequence is shuffled with the run's
    seed; any other iterable is read in order, restarted when it ends if it
    can be (a one-shot iterator that runs out is an :class:`EmptyInputError`)."""

    def __init__(self, data: Iterable[Any], what: str) -> None:
        self.what = what
        self.data = data
        self.is_sequence = isinstance(data, Sequence) and not isinstance(data, (str, bytes))
        if self.is_sequence and len(data) == 0:  # type: ignore[arg-type]
            raise EmptyInputError(f"{what} is empty", kind="empty_input", what=what)
        self._it: Iterator[Any] | None = None
        self._drawn = 0

    def draw(self, n: int, rng: np.random.Generator) -> list[Any]:
        if n == 0:
            return []
        if self.is_sequence:
            seq: Sequence[Any] = self.data  # type: ignore[assignment]
            order = np.concatenate([rng.permutation(len(seq)) for _ in range(-(-n // len(seq)))])
            return [seq[int(i)] for i in order[:n]]
        return [self._next() for _ in range(n)]

    def _next(self) -> Any:
        if self._it is None:
            self._it = iter(self.data)
        for restart in (False, True):
            if restart:
                fresh = iter(self.data)
                if fresh is self.data:  # a one-shot iterator: no second pass
                    break
                self._it = fresh
            try:
                item = next(self._it)
            except StopIteration:
                continue
            self._drawn += 1
            return item
        raise EmptyInputError(
            f"{self.what} ran out after {self._drawn} batches (pass a list or a re-iterable loader)",
            kind="empty_input", what=self.what, detail=f"{self._drawn} batches drawn",
        )


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar if tqdm is installed, else one plain line per run on stderr."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="probe runs", unit="run")


def collect_runs(
    train_step: TrainStep,
    base: Mapping[str, np.ndarray],
    benign: Iterable[Any],
    harmful: Iterable[Any],
    out_dir: str | os.PathLike[str],
    plan: RunPlan = RunPlan(),
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Runs ``plan``'s labelled fine-tunes from ``base``; returns the manifest's path.

    ``train_step(arrays, batch)`` takes the adapter (``{PEFT key: float32
    array}``) and one batch, and returns the adapter after one optimiser step
    with the same keys and shapes. If it has a ``start_run(seed)`` method, that
    is called before each run (reset the optimiser state there). ``base`` is
    the federation's starting adapter, in the federation's key layout.

    Errors: an empty ``benign``/``harmful`` is :class:`EmptyInputError`; a
    result with a missing or extra key, another shape, a non-float dtype or a
    NaN/∞ is a :class:`MissingKeyError` / :class:`ShapeMismatchError` /
    :class:`DTypeError` / :class:`NonFiniteError` with ``run`` and ``step``;
    an existing manifest in ``out_dir`` without ``overwrite`` is a
    :class:`SafeFedLLMIOError`.
    """
    runs = plan.check().runs()
    if not isinstance(base, Mapping) or not base:
        raise EmptyInputError("the base adapter holds no tensors", kind="empty_input", what="base adapter")
    # The user's key names are kept for train_step; the files get canonical ones.
    reference = checked_arrays(base, base, run="base", step=0)
    base_adapter = Adapter.from_arrays(reference)
    sources = {False: _Batches(benign, "benign batches"), True: _Batches(harmful, "harmful batches")}
    out = os.fspath(out_dir)
    manifest = os.path.join(out, MANIFEST)
    if os.path.exists(manifest) and not overwrite:
        raise SafeFedLLMIOError(
            f"{manifest} exists: pass overwrite=True or another folder",
            kind="io", path=manifest, source="file exists",
        )
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    base_adapter.save(os.path.join(out, "base.safetensors"))
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as f:
        json.dump({"plan": asdict(plan), "keys": sorted(reference), "runs": [r.group for r in runs]}, f, indent=1)
    bar = _progress(len(runs), progress)
    samples: list[Sample] = []
    start_run = getattr(train_step, "start_run", None)
    for index, run in enumerate(runs):
        rng = np.random.default_rng([plan.seed, index])
        if callable(start_run):
            start_run(int(rng.integers(0, 2**31 - 1)))
        batches = _run_batches(run, plan.steps, sources, rng)
        samples += _one_run(train_step, reference, run, batches, out)
        if bar is not None:
            bar.update(1)
        elif progress:
            print(f"probe runs: {index + 1}/{len(runs)} {run.group} ({plan.steps} steps)", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    write_manifest(manifest, samples)
    return manifest


def _run_batches(run: Run, steps: int, sources: dict[bool, _Batches], rng: np.random.Generator) -> list[Any]:
    """The run's batches: all benign, all harmful, or ``round(p·steps)`` harmful
    at seeded positions with the first among them."""
    if run.harmful_fraction in (0.0, 1.0):
        return sources[run.malicious].draw(steps, rng)
    k = int(round(run.harmful_fraction * steps))
    harmful_at = {0} | {int(i) + 1 for i in rng.choice(steps - 1, size=k - 1, replace=False)}
    harmful = iter(sources[True].draw(k, rng))
    benign = iter(sources[False].draw(steps - k, rng))
    return [next(harmful) if s in harmful_at else next(benign) for s in range(steps)]


def _one_run(train_step: TrainStep, reference: dict[str, np.ndarray], run: Run, batches: list[Any], out: str) -> list[Sample]:
    folder = os.path.join("runs", run.group)
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    arrays = {k: v.copy() for k, v in reference.items()}
    samples = []
    for step, batch in enumerate(batches, start=1):
        arrays = checked_arrays(train_step(arrays, batch), reference, run=run.group, step=step)
        path = os.path.join(folder, f"step-{step:04d}.safetensors")
        Adapter.from_arrays(arrays).save(os.path.join(out, path))
        samples.append(Sample(path=path, malicious=run.malicious, group=run.group, base="base.safetensors", step=step))
    return samples


def build_probe(
    manifest: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    threshold_policy: str | None = None,
    selection: str | Sequence[str] | None = None,
    folds: int = 5,
    c_grid: Sequence[float] | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> Probe:
    """Trains the calibrated probe from a manifest (C by group k-fold, Platt
    scaling, τ by ``threshold_policy``: ``"fixed:T"``, ``"target-fpr:F"`` or
    ``"max-f1"``; None is the library's default), as ``safe-fedllm-probe
    train`` does. Prints the out-of-fold summary when ``verbose``; saves to
    ``out`` if given. Only the selected feature tensors are held in memory."""
    deltas, labels, groups = load_deltas(manifest, keys=_feature_keys(manifest, selection))
    probe = Probe.train(
        deltas, labels, selection=selection, calibrated=True, threshold_policy=threshold_policy,
        folds=folds, c_grid=c_grid, seed=seed, groups=groups,
    )
    if verbose:
        print(summary(probe), file=sys.stderr)
    if out is not None:
        probe.save(os.fspath(out))
    return probe


def _feature_keys(manifest: str | os.PathLike[str], selection: str | Sequence[str] | None) -> list[str]:
    first = read_manifest(manifest)[0]
    folder = os.path.dirname(os.path.abspath(os.fspath(manifest)))
    arrays = Adapter.load(os.path.join(folder, first.path)).to_arrays()
    return FeatureSpec.fit([arrays], selection=selection).keys


def summary(probe: Probe) -> str:
    """One paragraph on a calibrated probe: C, τ with its out-of-fold FPR and
    recall, out-of-fold AUC, ECE and Brier score, sample counts."""
    info = probe.info
    cal, training = info.get("calibration") or {}, info.get("training") or {}
    t = cal.get("threshold") or {}
    return (
        f"probe: {training.get('benign')} benign + {training.get('malicious')} malicious samples "
        f"in {cal.get('groups')} runs, dim {training.get('trained_dim')}; C = {cal.get('c')}\n"
        f"  out-of-fold: AUC {cal.get('oof_roc_auc', float('nan')):.4f}, "
        f"ECE {cal.get('oof_ece', float('nan')):.4f}, Brier {cal.get('oof_brier', float('nan')):.4f}\n"
        f"  τ = {probe.threshold:.4f} ({_policy(t.get('policy'))}): FPR {t.get('false_positive_rate', float('nan')):.4f}, "
        f"recall {t.get('recall', float('nan')):.4f}, margin {t.get('margin', float('nan')):.4f}"
    )


def _policy(policy: Any) -> str:
    """The threshold policy as the command line spells it (``target-fpr:0.05``)."""
    if isinstance(policy, dict) and len(policy) == 1:
        ((name, value),) = policy.items()
        return f"{name.replace('_', '-')}:{value:g}" if isinstance(value, (int, float)) else name.replace("_", "-")
    return str(policy).replace("_", "-")


def evaluate_probe(probe: Probe, manifest: str | os.PathLike[str], threshold: float | None = None) -> dict[str, float]:
    """Scores a labelled manifest (fresh runs, never the training ones):
    ``n``, ``auc``, and at τ (the probe's or ``threshold``) ``accuracy``,
    ``fpr`` and ``recall``; the numbers ``safe-fedllm-probe eval`` prints."""
    deltas, labels, _ = load_deltas(manifest, keys=probe.feature_keys)
    scores = np.asarray(probe.score_batch(deltas), dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    tau = probe.threshold if threshold is None else threshold
    flagged = scores >= tau
    return {
        "n": float(len(y)),
        "auc": roc_auc(scores, y),
        "accuracy": float(np.mean(flagged == y)),
        "fpr": float(np.mean(flagged[~y])) if (~y).any() else float("nan"),
        "recall": float(np.mean(flagged[y])) if y.any() else float("nan"),
    }


def roc_auc(scores: np.ndarray, malicious: np.ndarray) -> float:
    """P(score of a malicious sample > score of a benign one), ties counted ½."""
    pos, neg = scores[malicious], scores[~malicious]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))
