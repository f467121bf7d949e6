"""Flower records <-> numpy: zero-copy views of the arrays (numpy's own
``.npy`` reader, no pickle), step trails."""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = ["array_record_to_numpy", "numpy_to_array_record", "npy_view", "split_trail"]

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def npy_view(arr: Array) -> np.ndarray:
    """A read-only ndarray over an ``Array``'s bytes, without copying.

    Flower's ``Array`` holds ``np.save`` output (``stype`` ``"numpy.ndarray"``).
    Its header is read by numpy's own reader (``numpy.lib.format``: a
    bounded header, parsed as a literal, never unpickled), and the values are
    ``np.frombuffer`` over the message bytes. Whatever the dtype, it is
    returned as is: the native round refuses anything but float32 with a
    typed ``DTypeError``. A Fortran-order array is made C-contiguous (one
    copy); a version-3 header goes through ``Array.numpy()`` (numpy's loader,
    ``allow_pickle=False``).

    The sender controls the bytes and the metadata alike: a serialisation
    other than numpy's, an object dtype (it would need pickle), data of
    another length than the header's shape, or a header disagreeing with the
    dtype and shape the ``Array`` declares raises ``ValueError`` /
    ``TypeError``, which the strategy records as that client's refusal.
    """
    if arr.stype != SType.NUMPY:
        raise TypeError(f"array serialised as {arr.stype!r}, not {SType.NUMPY!r}")
    data = arr.data
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    reader = _HEADER_READERS.get(version)
    if reader is None:
        return np.ascontiguousarray(arr.numpy())
    shape, fortran_order, dtype = reader(buf)
    if dtype.hasobject:
        raise ValueError(f"array of dtype {dtype} holds Python objects: refused (it would need pickle)")
    _check_metadata(arr, shape, dtype)
    count = math.prod(shape)
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"array bytes hold {len(data) - offset} bytes after the header, shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}")
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return np.ascontiguousarray(view.reshape(shape, order="F"))
    return view.reshape(shape)


def _check_metadata(arr: Array, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The dtype and shape the Array declares must be the ones its bytes hold."""
    declared_shape = tuple(int(d) for d in arr.shape)
    if declared_shape != tuple(shape) or np.dtype(arr.dtype) != dtype:
        raise ValueError(
            f"the Array declares {arr.dtype} {declared_shape}, its bytes hold {dtype} {tuple(shape)}")


def array_record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord; float32 arrays are zero-copy views."""
    return {name: npy_view(arr) for name, arr in record.items()}


def numpy_to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ndarrays (keys kept, order kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def split_trail(record: ArrayRecord | None) -> list[dict[str, np.ndarray]] | None:
    """Step trail ``{"<i>/<key>": a}`` → list of per-step dicts, in step order."""
    if record is None:
        return None
    steps: dict[int, dict[str, np.ndarray]] = {}
    for name, arr in record.items():
        index, sep, key = name.partition("/")
        if not sep or not index.isdigit():
            raise ValueError(f"step trail key {name!r} is not '<step>/<tensor key>'")
        steps.setdefault(int(index), {})[key] = npy_view(arr)
    if sorted(steps) != list(range(len(steps))):
        raise ValueError("step trail indices are not 0..n-1")
    return [steps[i] for i in range(len(steps))]
