"""Typed exceptions raised by safe_fedllm.

Every exception derives from :class:`SafeFedLLMError` and keeps the fields of
the Rust error variant as attributes, **under the variant's own field names**
(``None`` when a field does not apply), so a Flower strategy can act on them
rather than parse a message::

    try:
        probe.score(update)
    except ShapeMismatchError as e:
        print(e.tensor, e.expected, e.found)
    except NonFiniteError as e:
        print(e.tensor, e.index, e.value)

``kind`` names the Rust variant (``"shape_mismatch"``, ``"non_finite"``, …);
one class may serve several variants (each class lists its kinds and their
fields). The context the Rust error was wrapped in is kept too: ``path``
(the file), ``client`` (whose message it was), ``line`` / ``root`` (the
manifest line and folder of a sample). The only renamed field is
``NotAFile``'s ``kind``: ``file_kind`` ("directory", "FIFO", …).
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
    path: str | None = None
    line: int | None = None
    root: str | None = None
    # Fields several variants share (each class lists which of its kinds set them).
    tensor: str | None = None
    expected: Any = None
    found: Any = None
    value: Any = None
    reason: str | None = None
    what: str | None = None
    detail: str | None = None
    index: int | None = None

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)

    def fields(self) -> dict[str, Any]:
        """The error's fields (attributes that are set), without the message."""
        return {k: v for k, v in vars(self).items() if k != "message" and v is not None}


class InputTypeError(SafeFedLLMError, TypeError):
    """An argument has the wrong Python type (not a dict of arrays, …); ``field``
    names a report's missing field, ``tensor`` an array that cannot be borrowed."""

    field: str | None = None


class DTypeError(InputTypeError):
    """An array is not float32 (kind ``wrong_dtype``: ``tensor``, ``dtype``), or a
    file holds a dtype not read there (``unsupported_dtype``: ``tensor``,
    ``dtype``, ``supported``)."""

    dtype: str | None = None
    supported: str | None = None


class NotContiguousError(SafeFedLLMError, ValueError):
    """An array (``tensor``) is not C-contiguous: safe_fedllm reads buffers without copying."""


class ShapeMismatchError(SafeFedLLMError, ValueError):
    """A shape or length differs from what was expected. Kinds and fields:

    * ``shape_mismatch``: ``tensor``, ``expected``, ``found`` (shapes);
    * ``not_a_matrix``: ``tensor``, ``shape``;
    * ``data_length``: ``tensor``, ``shape``, ``expected``, ``found`` (value counts);
    * ``rank_mismatch``: ``module``, ``a_shape``, ``b_shape``, ``a_rank``, ``b_rank``;
    * ``dimension_mismatch``, ``length_mismatch``: ``what``, ``expected``, ``found``;
    * ``attack_input``: ``index``, ``tensor``, ``reason``.
    """

    shape: list[int] | None = None
    module: str | None = None
    a_shape: list[int] | None = None
    b_shape: list[int] | None = None
    a_rank: int | None = None
    b_rank: int | None = None


class MissingKeyError(SafeFedLLMError, KeyError):
    """A ``tensor`` is present on one side only (``present_in`` / ``missing_from``)."""

    present_in: str | None = None
    missing_from: str | None = None

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class KeyFormatError(SafeFedLLMError, ValueError):
    """A name is not a LoRA A/B key (``not_a_lora_key``: ``key``), two names denote
    the same tensor (``duplicate_key``: ``canonical``, ``first``, ``second``), a file
    mixes adapters (``mixed_adapters``: ``first``, ``second``), or another library's
    tensor has no PEFT name (``unmapped_tensor``: ``library``, ``tensor``, ``map``)."""

    key: str | None = None
    canonical: str | None = None
    first: str | None = None
    second: str | None = None
    library: str | None = None
    map: str | None = None


class NonFiniteError(SafeFedLLMError, ValueError):
    """A NaN or infinity where finite numbers are required: in a tensor
    (``non_finite``: ``tensor``, ``index``, ``value``) or a feature matrix
    (``non_finite_feature``: ``what``, ``row``, ``column``, ``value``), or a
    finite value that would be stored as ±inf (``storage_overflow``:
    ``tensor``, ``index``, ``value``, ``dtype``)."""

    row: int | None = None
    column: int | None = None
    dtype: str | None = None


class InvalidParameterError(SafeFedLLMError, ValueError):
    """A setting is out of range (``invalid_parameter``: ``component``, ``name``,
    ``value``, ``expected``), or a feature selection matched nothing
    (``empty_selection``: ``selection``)."""

    component: str | None = None
    name: str | None = None
    selection: str | None = None


class SpecError(InvalidParameterError):
    """A defense spec has an unknown or misspelt key, a value of the wrong type or out of
    range (``key``: the dotted path, or the Flower ``run_config`` key it came from;
    ``reason``; ``suggestion``: the closest known key)."""

    key: str | None = None
    suggestion: str | None = None


class InvalidEvidenceError(SafeFedLLMError, ValueError):
    """A client's evidence cannot be used (``invalid_evidence``: ``client``,
    ``round``, ``reason``) or its security factor is not in [0, 1]
    (``invalid_security_factor``: ``client``, ``value``)."""

    round: int | None = None


class CheckpointError(SafeFedLLMError, ValueError):
    """A checkpoint (detector state, feature spec, strategy state) is malformed or
    inconsistent (``invalid_checkpoint``: ``what``, ``value``)."""


class FormatError(SafeFedLLMError, ValueError):
    """A file or buffer is malformed. Kinds and fields:

    * ``malformed``: ``malformed`` (what is wrong: ``"invalid_offset"``, …) and
      its ``tensor`` / ``valid_up_to`` / ``detail``;
    * ``input_too_large``: ``found``, ``limit``; ``header_too_large``: ``declared``, ``limit``;
    * ``invalid_metadata``: ``field``, ``value``, ``reason``;
    * ``serialize``: ``what``, ``reason``; ``manifest``: ``line``, ``reason``;
    * ``interop_failed``: ``library``, ``tensor``, ``reason``.
    """

    malformed: str | None = None
    valid_up_to: int | None = None
    declared: int | None = None
    limit: int | None = None
    field: str | None = None
    library: str | None = None


class EmptyInputError(SafeFedLLMError, ValueError):
    """A collection that must not be empty (``what``) was empty."""


class TrainingError(SafeFedLLMError, ValueError):
    """Probe training failed: a class is missing (``missing_class``: ``missing``,
    ``samples``), the solver diverged (``numerical_failure``: ``solver``,
    ``iteration``, ``detail``), the trainer failed (``trainer_failed``:
    ``trainer``, ``reason``) or calibration did (``calibration_failed``: ``detail``)."""

    missing: str | None = None
    samples: int | None = None
    solver: str | None = None
    iteration: int | None = None
    trainer: str | None = None


class TooFewClientsError(SafeFedLLMError, ValueError):
    """A ``rule``'s robustness ``constraint`` needs ``required`` usable clients; ``found`` were left."""

    rule: str | None = None
    constraint: str | None = None
    required: int | None = None


class DuplicateClientError(SafeFedLLMError, ValueError):
    """Two updates in one round claim the same ``client``."""


class SafeFedLLMIOError(SafeFedLLMError, OSError):
    """Reading or writing a file failed (``io``: ``path``, ``source``: the OS error's
    message), writing to a caller's writer failed (``write``: ``what``, ``source``),
    or a path is not a regular file (``not_a_file``: ``path``, ``file_kind``)."""

    source: str | None = None
    file_kind: str | None = None

    def __init__(self, message: str, **fields: Any) -> None:
        SafeFedLLMError.__init__(self, message, **fields)

    def __str__(self) -> str:
        return self.message


class SizeOverflowError(SafeFedLLMError, OverflowError):
    """A size computed from the input does not fit (``what``, ``detail``)."""


class InternalError(SafeFedLLMError, RuntimeError):
    """An internal invariant of safe_fedllm broke: a bug, never the input's fault.

    ``location`` is where, ``invariant`` what should have held and ``detail``
    the values that broke it. Please report it.
    """

    location: str | None = None
    invariant: str | None = None


class ThreadPoolError(SafeFedLLMError, RuntimeError):
    """:func:`safe_fedllm.set_num_threads` came too late: rayon's global pool
    already runs (it starts at the first parallel call, or an earlier
    ``set_num_threads``)."""
