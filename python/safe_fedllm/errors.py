"""Typed exceptions raised by safe_fedllm.

Every exception derives from :class:`SafeFedLLMError` and keeps the fields of
the Rust error as attributes (``None`` when a field does not apply), so a
Flower strategy can act on them rather than parse a message::

    try:
        probe.score(update)
    except ShapeMismatchError as e:
        print(e.key, e.expected, e.found)
    except NonFiniteError as e:
        print(e.key, e.index, e.value)

``kind`` names the Rust variant (``"shape_mismatch"``, ``"non_finite"``, …).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SafeFedLLMError",
    "InputTypeError",
    "DTypeError",
    "NotContiguousError",
    "ShapeMismatchError",
    "MissingKeyError",
    "KeyFormatError",
    "NonFiniteError",
    "InvalidParameterError",
    "SpecError",
    "InvalidEvidenceError",
    "CheckpointError",
    "FormatError",
    "EmptyInputError",
    "TrainingError",
    "TooFewClientsError",
    "DuplicateClientError",
    "SafeFedLLMIOError",
    "SizeOverflowError",
    "InternalError",
    "ThreadPoolError",
]


class SafeFedLLMError(Exception):
    """Base class of every safe_fedllm error."""

    kind: str | None = None
    client: str | None = None
    key: str | None = None
    expected: Any = None
    found: Any = None
    round: int | None = None
    param: str | None = None
    value: Any = None
    index: Any = None
    path: str | None = None
    rule: str | None = None
    reason: str | None = None
    what: str | None = None
    component: str | None = None

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)

    def fields(self) -> dict[str, Any]:
        """The error's fields (attributes that are set), without the message."""
        return {k: v for k, v in vars(self).items() if k != "message" and v is not None}


class InputTypeError(SafeFedLLMError, TypeError):
    """An argument has the wrong Python type (not a dict of arrays, …)."""


class DTypeError(InputTypeError):
    """An array is not float32 (``dtype`` says what it is), or a file holds an unsupported dtype."""

    dtype: str | None = None


class NotContiguousError(SafeFedLLMError, ValueError):
    """An array is not C-contiguous: safe_fedllm reads buffers without copying."""


class ShapeMismatchError(SafeFedLLMError, ValueError):
    """A tensor's shape differs from what was expected (``expected``/``found``), or is not 2-D."""


class MissingKeyError(SafeFedLLMError, KeyError):
    """A tensor is present on one side only (``present_in``/``missing_from``)."""

    present_in: str | None = None
    missing_from: str | None = None

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class KeyFormatError(SafeFedLLMError, ValueError):
    """A name is not a LoRA A/B key, or two names denote the same tensor."""


class NonFiniteError(SafeFedLLMError, ValueError):
    """A NaN or infinity where finite numbers are required (``key``, ``index``, ``value``)."""


class InvalidParameterError(SafeFedLLMError, ValueError):
    """A setting is out of range (``component``, ``param``, ``value``, ``expected``)."""


class SpecError(InvalidParameterError):
    """A defense spec has an unknown or misspelt key, a value of the wrong type or out of
    range (``key``: the dotted path, ``reason``, ``suggestion``: the closest known key)."""


class InvalidEvidenceError(SafeFedLLMError, ValueError):
    """A client's evidence or security factor cannot be used (``client``, ``round``)."""


class CheckpointError(SafeFedLLMError, ValueError):
    """A checkpoint (detector state, feature spec) is malformed or inconsistent."""


class FormatError(SafeFedLLMError, ValueError):
    """A file or buffer is malformed (safetensors, metadata, manifest)."""


class EmptyInputError(SafeFedLLMError, ValueError):
    """A collection that must not be empty was empty."""


class TrainingError(SafeFedLLMError, ValueError):
    """Probe training failed (a class is missing, the solver diverged)."""


class TooFewClientsError(SafeFedLLMError, ValueError):
    """A rule's robustness constraint needs more usable clients (``expected``, ``found``)."""


class DuplicateClientError(SafeFedLLMError, ValueError):
    """Two updates in one round claim the same ``client``."""


class SafeFedLLMIOError(SafeFedLLMError, OSError):
    """Reading or writing a file failed (``path``)."""

    def __init__(self, message: str, **fields: Any) -> None:
        SafeFedLLMError.__init__(self, message, **fields)

    def __str__(self) -> str:
        return self.message


class SizeOverflowError(SafeFedLLMError, OverflowError):
    """A size computed from the input does not fit (``what``, ``reason``)."""


class InternalError(SafeFedLLMError, RuntimeError):
    """An internal invariant of safe_fedllm broke: a bug, never the input's fault.

    ``what`` is where, ``expected`` the invariant and ``reason`` the values
    that broke it. Please report it.
    """


class ThreadPoolError(SafeFedLLMError, RuntimeError):
    """:func:`safe_fedllm.set_num_threads` came too late: rayon's global pool
    already runs (it starts at the first parallel call, or an earlier
    ``set_num_threads``)."""
