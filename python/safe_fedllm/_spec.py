"""Defense specs for the Flower strategy: read from Flower's ``run_config``.

Flower's ``run_config`` is the ``[tool.flwr.app.config]`` table of the app's
``pyproject.toml``, fused with ``flwr run --run-config`` overrides and
flattened to dotted keys. The strategy reads two kinds of keys from it:

* ``safe-fedllm.spec-file``: the path of a defense spec (``.toml``, else
  JSON); empty or absent: the safe defaults. A relative path is read against
  ``base_dir`` (default: the working directory).
* ``safe-fedllm.spec.<section>.<key>``: one setting of the spec, merged into
  the file's spec before it is checked, e.g. ``safe-fedllm.spec.gate.threshold
  = 0.3`` or ``safe-fedllm.spec.detector.level = "evidence"``.

The file's key is not ``safe-fedllm.spec`` because TOML (pyproject and
``--run-config`` alike) cannot hold a key that is both a string and a table
of settings. Any other ``safe-fedllm.*`` key is a :class:`SpecError` naming
it: a misspelt key is never a silent default. Keys of the app's own
(``num-server-rounds``, …) are ignored.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import _native
from .errors import SpecError

__all__ = ["AdmissionPolicy", "SPEC_FILE_KEY", "SPEC_KEY_PREFIX", "keyword_spec", "read_spec_file", "spec_from_run_config"]

#: run_config key naming the spec file.
SPEC_FILE_KEY = "safe-fedllm.spec-file"
#: run_config prefix of one spec setting (``safe-fedllm.spec.gate.threshold``).
SPEC_KEY_PREFIX = "safe-fedllm.spec."
_NAMESPACE = "safe-fedllm."


def read_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A spec file as a dict: TOML when the name ends in ``.toml``, JSON otherwise
    (the rule the Rust reader follows)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"spec file {path}: {e}", kind="spec", key=SPEC_FILE_KEY, reason=str(e), path=str(path)) from e
    try:
        spec = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"spec file {path}: {e}", kind="spec", key="<file>", reason=str(e), path=str(path)) from e
    if not isinstance(spec, dict):
        raise SpecError(f"spec file {path} does not hold a table", kind="spec", key="<file>",
                        reason="not a table", path=str(path))
    return spec


def _unknown_key(key: str) -> SpecError:
    known = [SPEC_FILE_KEY, SPEC_KEY_PREFIX.rstrip(".")]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    suggestion = close[0] if close else None
    if key == "safe-fedllm.spec":
        reason = (f"the spec file's key is `{SPEC_FILE_KEY}` (TOML cannot hold `safe-fedllm.spec` as a path "
                  f"and as the table of `{SPEC_KEY_PREFIX}<section>.<key>` settings)")
        suggestion = SPEC_FILE_KEY
    else:
        reason = f"unknown key: the strategy reads `{SPEC_FILE_KEY}` and `{SPEC_KEY_PREFIX}<section>.<key>`"
    hint = f" (did you mean `{suggestion}`?)" if suggestion else ""
    return SpecError(f"run_config key `{key}`: {reason}{hint}", kind="spec", key=key, reason=reason,
                     suggestion=suggestion)


def _set(spec: dict[str, Any], run_key: str, value: Any) -> None:
    """Sets ``spec[a][b][c] = value`` for ``safe-fedllm.spec.a.b.c``; a
    non-table on the way (``trail = "exact"`` under ``trail.max_abs``) is replaced."""
    parts = run_key[len(SPEC_KEY_PREFIX):].split(".")
    if not all(parts):
        raise _unknown_key(run_key)
    node = spec
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _rekeyed(error: SpecError, overrides: list[str]) -> SpecError:
    """A spec error caused by a run_config override, under that run_config key."""
    for key in overrides:
        if error.key == key or (error.key or "").startswith(key + "."):
            named = SPEC_KEY_PREFIX + str(error.key)
        elif key.startswith(f"{error.key}."):
            named = SPEC_KEY_PREFIX + key
        else:
            continue
        hint = f" (did you mean `{error.suggestion}`?)" if error.suggestion else ""
        return SpecError(f"run_config key `{named}`: {error.reason}{hint}", kind="spec", key=named,
                         reason=error.reason, suggestion=error.suggestion)
    return error


def spec_from_run_config(
    run_config: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, Any], str | None]:
    """The defense spec a Flower ``run_config`` describes, checked.

    Returns the spec (a dict: the file's, with the ``safe-fedllm.spec.*``
    settings merged in) and the folder its relative paths (the probe's) are
    read against: the spec file's folder, else ``base_dir``. Raises
    :class:`SpecError` naming the run_config key for an unknown
    ``safe-fedllm.*`` key and for a setting the spec refuses.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec: dict[str, Any] = {}
    spec_dir: str | None = os.fspath(base_dir) if base_dir is not None else None
    file = run_config.get(SPEC_FILE_KEY, "")
    if file:
        path = Path(str(file))
        path = path if path.is_absolute() else base / path
        spec = read_spec_file(path)
        spec_dir = os.fspath(path.parent)
    overrides = []
    for key in sorted(run_config):
        if not key.startswith(_NAMESPACE) or key == SPEC_FILE_KEY:
            continue
        if not key.startswith(SPEC_KEY_PREFIX):
            raise _unknown_key(key)
        _set(spec, key, run_config[key])
        overrides.append(key[len(SPEC_KEY_PREFIX):])
    try:
        _native.check_spec(spec, base_dir=spec_dir)
    except SpecError as e:
        raise _rekeyed(e, overrides) from None
    return spec, spec_dir


def _core_bound_name(bound: Mapping[str, Any]) -> str | None:
    """The ``norm_bound`` name of a core bound (``None`` for unbounded)."""
    return None if bound["bound"] == "unbounded" else bound["bound"]


# The core's ``Admission::default()``, read once from the native module (the
# canonical form of an empty spec): the one definition of every default below.
_CORE_ADMISSION: dict[str, Any] = _native.check_spec({})["spec"]["admission"]


@dataclass(frozen=True)
class AdmissionPolicy:
    """What a reply must satisfy before the defence looks at it: a typed way
    to write the spec's ``admission`` section (:meth:`to_spec`).

    The adversary controls its whole reply, including ``num-examples`` (its
    FedAvg weight). Every reply is decided by the native round's admission
    stage, one code path: a reply the strategy cannot even decode (no
    ArrayRecord, a ``num-examples`` that is not a non-negative integer, a
    failed reply, a node that sent nothing) enters it as a refused report,
    and the bindings refuse non-float32, non-2-D and non-LoRA arrays the
    same way; admission then checks keys and shapes against the global
    adapter, finiteness, the probe's keys, the norm bound and the sample
    policy. Every rejection is a typed entry in the audit and counts 0 in the
    safety gate's mean. Defaults fail closed.

    * ``samples``: ``"cap_at_median_multiple"`` (default, ``sample_value`` =
      1.0: no client weighs more than the round's lower median count),
      ``"cap_at"`` (``sample_value`` = the largest count a client can hold),
      ``"uniform"`` (ignore counts) or ``"trust"`` (the reference; unsafe).
    * ``norm_bound``: ``"median_multiple"`` (default, ``norm_value`` = 1.0:
      updates are clipped to the round's lower median norm),
      ``"absolute"`` (``norm_value`` = the bound on ‖update − global‖₂) or
      ``None`` (unbounded); ``over_bound``: ``"clip"`` (default) or ``"exclude"``.
    * ``require_probe_keys``: reject an update without the probe's tensors.

    The defaults are the Rust ``Admission::default()`` (``AdmissionPolicy().to_spec()``
    equals an empty ``admission`` section): each admitted client pulls the
    global by at most one median client's worth.
    """

    samples: str = _CORE_ADMISSION["samples"]["policy"]
    sample_value: float | None = _CORE_ADMISSION["samples"].get("value")
    norm_bound: str | None = _core_bound_name(_CORE_ADMISSION["norm_bound"])
    norm_value: float | None = _CORE_ADMISSION["norm_bound"].get("value")
    over_bound: str = _CORE_ADMISSION["over_bound"]
    require_probe_keys: bool = _CORE_ADMISSION["require_probe_keys"]

    @classmethod
    def reference(cls) -> "AdmissionPolicy":
        """The reference implementation's trust (for reproducing the paper only)."""
        return cls(samples="trust", sample_value=None, norm_bound=None, norm_value=None, require_probe_keys=False)

    def to_spec(self) -> dict[str, Any]:
        """The policy as the ``admission`` section of a defense spec."""
        samples: dict[str, Any] = {"policy": self.samples}
        if self.samples == "cap_at":
            samples["value"] = int(self.sample_value or 0)
        elif self.samples == "cap_at_median_multiple":
            multiple = self.sample_value if self.sample_value is not None else _CORE_ADMISSION["samples"]["value"]
            samples["value"] = float(multiple)
        bound: dict[str, Any] = {"bound": "unbounded"}
        if self.norm_bound is not None:
            bound = {"bound": self.norm_bound, "value": float(self.norm_value or 0.0)}
        return {
            "samples": samples,
            "norm_bound": bound,
            "over_bound": self.over_bound,
            "require_probe_keys": self.require_probe_keys,
        }

    @staticmethod
    def declared_samples(raw: Any) -> int:
        """The declared count as an int; raises ValueError for anything else."""
        if isinstance(raw, bool) or raw is None:
            raise ValueError(f"num-examples {raw!r} is not an integer")
        if isinstance(raw, float):
            if not (math.isfinite(raw) and raw == int(raw)):
                raise ValueError(f"num-examples {raw!r} is not an integer")
            raw = int(raw)
        if not isinstance(raw, (int, np.integer)) or raw < 0:
            raise ValueError(f"num-examples {raw!r} is not a non-negative integer")
        return min(int(raw), 2**63 - 1)


def keyword_spec(
    level: str | None = None,
    detector_settings: Mapping[str, Any] | None = None,
    rule: str | None = None,
    rule_settings: Mapping[str, Any] | None = None,
    skip_avg_weight: float | None = None,
    trail: str | float | None = None,
    admission: AdmissionPolicy | None = None,
) -> dict[str, Any]:
    """The spec the deprecated keyword form describes (only the sections it sets)."""
    spec: dict[str, Any] = {}
    if level is not None or detector_settings:
        spec["detector"] = {"level": level or "client", **(detector_settings or {})}
    if rule is not None or rule_settings:
        spec["aggregator"] = {"rule": rule or "fedavg", **(rule_settings or {})}
    if skip_avg_weight is not None:
        spec["gate"] = {"threshold": skip_avg_weight}
    if trail is not None:
        spec["trail"] = {"max_abs": float(trail)} if isinstance(trail, (int, float)) else trail
    if admission is not None:
        spec["admission"] = admission.to_spec()
    return spec
