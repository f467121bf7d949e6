"""The strategy's durable state: one versioned file, replaced atomically.

A ServerApp can die at any point of a round. What it must not lose is
everything a restarted ServerApp needs to continue as if nothing happened:

* the global arrays (the model the next round starts from),
* the number of completed rounds (so round numbers never repeat),
* the detector's per-client memory (so no client's trust is reset),
* the shadow base (the evidence levels score every shadow branch against it),
* the round's audit line (so the audit log can be completed after a crash
  between writing this file and appending the line).

They are written together as one ``.npz`` file (a zip of ``.npy`` arrays, read
with ``allow_pickle=False``): ``state.json`` (UTF-8 JSON as a uint8 array)
plus ``global/<i>`` and ``shadow/<i>`` arrays whose names are listed in the
JSON. The file is written to a temporary name in the same folder, flushed,
fsynced and renamed over the old one: a reader sees the previous state or the
new one, never a mix.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CheckpointError

__all__ = ["STATE_FORMAT", "STATE_VERSION", "StrategyState", "append_audit_line", "complete_audit_log"]

#: The ``format`` field of a state file.
STATE_FORMAT = "safe-fedllm/flower-strategy-state"
#: The version this module writes and reads.
STATE_VERSION = 1


@dataclass
class StrategyState:
    """Everything a restarted strategy resumes from."""

    completed_rounds: int
    level: str
    detector: dict[str, Any]
    global_arrays: dict[str, np.ndarray]
    shadow_base: dict[str, np.ndarray] | None = None
    last_audit_line: dict[str, Any] | None = None
    identities: dict[str, str] = field(default_factory=dict)

    def save(self, path: str) -> None:
        """Writes the state atomically (temporary file, fsync, rename, fsync of the folder)."""
        header = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "completed_rounds": self.completed_rounds,
            "level": self.level,
            "detector": self.detector,
            "global_keys": list(self.global_arrays),
            "shadow_keys": None if self.shadow_base is None else list(self.shadow_base),
            "last_audit_line": self.last_audit_line,
            "identities": self.identities,
        }
        arrays: dict[str, np.ndarray] = {
            "state.json": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        }
        for i, a in enumerate(self.global_arrays.values()):
            arrays[f"global/{i}"] = np.ascontiguousarray(a)
        for i, a in enumerate((self.shadow_base or {}).values()):
            arrays[f"shadow/{i}"] = np.ascontiguousarray(a)
        folder = os.path.dirname(os.path.abspath(path))
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)

    @classmethod
    def load(cls, path: str) -> "StrategyState":
        """Reads a state file; raises :class:`CheckpointError` naming what is wrong."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                files = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"state file {path}: {e}", kind="checkpoint", path=path) from e
        raw = files.get("state.json")
        if raw is None:
            raise CheckpointError(f"state file {path} has no state.json entry", kind="checkpoint", path=path)
        try:
            header = json.loads(bytes(raw.astype(np.uint8)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"state file {path}: state.json: {e}", kind="checkpoint", path=path) from e
        if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"state file {path} is format {header.get('format')!r} version {header.get('version')!r}; "
                f"this safe_fedllm reads {STATE_FORMAT!r} version {STATE_VERSION}",
                kind="checkpoint", path=path,
            )

        def arrays(prefix: str, keys: list[str] | None) -> dict[str, np.ndarray] | None:
            if keys is None:
                return None
            out = {}
            for i, key in enumerate(keys):
                name = f"{prefix}/{i}"
                if name not in files:
                    raise CheckpointError(f"state file {path} lacks array {name} ({key})", kind="checkpoint", path=path)
                out[key] = files[name]
            return out

        return cls(
            completed_rounds=int(header["completed_rounds"]),
            level=str(header["level"]),
            detector=header["detector"],
            global_arrays=arrays("global", header["global_keys"]) or {},
            shadow_base=arrays("shadow", header["shadow_keys"]),
            last_audit_line=header.get("last_audit_line"),
            identities=dict(header.get("identities") or {}),
        )


def _fsync_dir(folder: str) -> None:
    """Makes a rename durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_audit_line(path: str, line: dict[str, Any]) -> None:
    """Appends one JSON line and fsyncs it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def complete_audit_log(path: str, state: StrategyState) -> int:
    """Brings an audit log in line with a state file after a crash.

    A crash can leave a torn last line (cut off mid-write: it is dropped) or
    a log one round behind the state (the process died between saving the
    state and appending the round's line: the line saved in the state is
    appended). Returns the last round the log then records (0 when empty).
    """
    if not os.path.exists(path):
        last = 0
    else:
        with open(path, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut != len(data):
            with open(path, "r+b") as f:
                f.truncate(cut)
        last = 0
        for raw in data[:cut].splitlines():
            try:
                last = max(last, int(json.loads(raw).get("server_round", 0)))
            except (ValueError, AttributeError):
                continue
    line = state.last_audit_line
    if line is not None and last < state.completed_rounds == int(line.get("server_round", -1)):
        append_audit_line(path, line)
        last = state.completed_rounds
    return last
