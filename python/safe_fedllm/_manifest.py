"""The probe manifest (JSON lines) and the checks on adapters a training callback returns.

The manifest is the one ``safe-fedllm-probe train --help`` documents: one
labelled adapter file per line, ``path`` and ``base`` relative to the
manifest's own folder, ``group`` the run the sample belongs to. The reader
here accepts exactly the same fields, so a manifest that trains in Python
trains with the command-line tool and back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ._native import Adapter, delta
from .errors import (
    DTypeError,
    EmptyInputError,
    FormatError,
    InputTypeError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
)

MANIFEST_FIELDS = frozenset({"path", "label", "base", "group", "client", "round", "step"})
LABELS = {"benign": False, "malicious": True, 0: False, 1: True}


@dataclass(frozen=True)
class Sample:
    """One manifest line: an adapter file, its label and the run it came from."""

    path: str
    malicious: bool
    group: str
    base: str | None = None
    step: int | None = None

    def line(self) -> str:
        """The manifest line (paths as given, relative to the manifest's folder)."""
        entry: dict[str, Any] = {
            "path": self.path,
            "label": "malicious" if self.malicious else "benign",
        }
        if self.base is not None:
            entry["base"] = self.base
        entry["group"] = self.group
        if self.step is not None:
            entry["step"] = self.step
        return json.dumps(entry, sort_keys=False)


def write_manifest(path: str, samples: Iterable[Sample]) -> None:
    """Writes the manifest through a temporary file, so a crash leaves no half manifest."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(s.line() + "\n")
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike[str]) -> list[Sample]:
    """Parses a manifest; unknown fields, a missing path or a bad label are a
    :class:`FormatError` (``kind="manifest"``, ``line``, ``reason``)."""
    path = os.fspath(path)
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            samples.append(_parse_line(path, number, text))
    if not samples:
        raise EmptyInputError(f"manifest {path} holds no samples", kind="empty_input", what="manifest", path=path)
    return samples


def _parse_line(path: str, number: int, text: str) -> Sample:
    def bad(reason: str) -> FormatError:
        return FormatError(f"{path}:{number}: {reason}", kind="manifest", path=path, line=number, reason=reason)

    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON: {exc.msg}") from exc
    if not isinstance(entry, dict):
        raise bad("a line is a JSON object")
    unknown = sorted(set(entry) - MANIFEST_FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    file = entry.get("path")
    if not isinstance(file, str) or not file:
        raise bad("`path` (a non-empty string) is required")
    label = entry.get("label")
    if isinstance(label, bool) or label not in LABELS:
        raise bad(f"`label` is 'benign', 'malicious', 0 or 1, not {label!r}")
    base = entry.get("base")
    if base is not None and not isinstance(base, str):
        raise bad("`base` is a string")
    group = entry.get("group", entry.get("client"))
    if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
        raise bad("`group` is a string or an integer")
    step = entry.get("step")
    return Sample(
        path=file,
        malicious=LABELS[label],
        group=f"line-{number}" if group is None else str(group),
        base=base,
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
    )


def load_deltas(
    manifest: str | os.PathLike[str], keys: Iterable[str] | None = None
) -> tuple[list[dict[str, np.ndarray]], list[bool], list[int]]:
    """The manifest's samples as ``(deltas, labels, groups)`` for :meth:`Probe.train`.

    Each delta is ``path − base`` (or the file itself without a base); ``keys``
    keeps only those tensors (the probe's features), so a long manifest of a
    large adapter fits in memory. ``groups`` numbers the distinct groups.
    """
    manifest = os.fspath(manifest)
    folder = os.path.dirname(os.path.abspath(manifest))
    wanted = None if keys is None else set(keys)
    bases: dict[str, dict[str, np.ndarray]] = {}
    group_ids: dict[str, int] = {}
    deltas, labels, groups = [], [], []
    for s in read_manifest(manifest):
        arrays = Adapter.load(os.path.join(folder, s.path)).to_arrays()
        if s.base is not None:
            if s.base not in bases:
                bases[s.base] = Adapter.load(os.path.join(folder, s.base)).to_arrays()
            arrays = delta(arrays, bases[s.base]).to_arrays()
        if wanted is not None:
            arrays = {k: v for k, v in arrays.items() if k in wanted}
        deltas.append(arrays)
        labels.append(s.malicious)
        groups.append(group_ids.setdefault(s.group, len(group_ids)))
    return deltas, labels, groups


def checked_arrays(
    arrays: Any, reference: Mapping[str, np.ndarray], *, run: str, step: int
) -> dict[str, np.ndarray]:
    """``arrays`` (what a training callback returned) as float32 arrays with
    exactly ``reference``'s keys and shapes, all finite; else a typed error
    naming the run, the step and the tensor."""
    where = f"run {run}, step {step}"
    if not isinstance(arrays, Mapping):
        raise InputTypeError(
            f"{where}: train_step returned {type(arrays).__name__}, not a mapping of arrays",
            kind="input_type", run=run, step=step,
        )
    for key in reference:
        if key not in arrays:
            raise MissingKeyError(
                f"{where}: tensor `{key}` of the base adapter is missing from train_step's result",
                kind="missing_key", tensor=key, present_in="base", missing_from="train_step result", run=run, step=step,
            )
    out = {}
    for key, value in arrays.items():
        if key not in reference:
            raise MissingKeyError(
                f"{where}: train_step returned tensor `{key}`, which the base adapter lacks",
                kind="missing_key", tensor=key, present_in="train_step result", missing_from="base", run=run, step=step,
            )
        out[key] = _checked_tensor(value, reference[key], key, where, run, step)
    return out


def _checked_tensor(value: Any, ref: np.ndarray, key: str, where: str, run: str, step: int) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise DTypeError(
            f"{where}: tensor `{key}` has dtype {array.dtype}, not a float type",
            kind="wrong_dtype", tensor=key, dtype=str(array.dtype), run=run, step=step,
        )
    if array.shape != ref.shape:
        raise ShapeMismatchError(
            f"{where}: tensor `{key}` has shape {list(array.shape)}, the base adapter {list(ref.shape)}",
            kind="shape_mismatch", tensor=key, expected=list(ref.shape), found=list(array.shape), run=run, step=step,
        )
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes ±inf, refused below
        array = np.ascontiguousarray(array, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        index = int(bad[0])
        raise NonFiniteError(
            f"{where}: tensor `{key}` holds {array.flat[index]} at flat index {index} (in float32)",
            kind="non_finite", tensor=key, index=index, value=float(array.flat[index]), run=run, step=step,
        )
    return array
