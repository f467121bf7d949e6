"""Flower records <-> numpy: zero-copy views of float32 arrays, step trails."""

from __future__ import annotations

import io
import re

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["array_record_to_numpy", "numpy_to_array_record", "npy_view", "split_trail"]

_NPY_MAGIC = b"\x93NUMPY"
# The header numpy writes for a C-order little-endian float32 matrix; anything
# else goes through numpy's own (slower, literal_eval-based) header parser.
_F32_MATRIX_HEADER = re.compile(
    rb"\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n"
)


def npy_view(arr: Array) -> np.ndarray:
    """A read-only view of an ``Array``'s bytes as an ndarray, without copying.

    Parses the ``.npy`` header itself (no pickle is ever allowed) and returns
    ``np.frombuffer`` over the message bytes; falls back to ``Array.numpy()``
    for anything unusual (made C-contiguous, so a Fortran-order upload is
    read correctly) so the caller's checks see the real dtype.
    """
    data = arr.data
    if arr.stype != "numpy.ndarray" or not isinstance(data, (bytes, bytearray)):
        return np.ascontiguousarray(arr.numpy())
    if data[:6] == _NPY_MAGIC and data[6:8] == b"\x01\x00" and len(data) >= 10:
        header_len = int.from_bytes(data[8:10], "little")
        match = _F32_MATRIX_HEADER.fullmatch(data, 10, 10 + header_len)
        if match is not None:
            rows, cols = int(match.group(1)), int(match.group(2))
            offset = 10 + header_len
            if len(data) - offset != rows * cols * 4:
                raise ValueError(f"array bytes hold {len(data) - offset} bytes, shape ({rows}, {cols}) needs {rows * cols * 4}")
            return np.frombuffer(data, dtype=np.float32, count=rows * cols, offset=offset).reshape(rows, cols)
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            return np.ascontiguousarray(arr.numpy())
    except ValueError:
        return np.ascontiguousarray(arr.numpy())
    if dtype != np.dtype("<f4") or fortran or dtype.hasobject:
        return np.ascontiguousarray(arr.numpy())
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset = buf.tell()
    if len(data) - offset != count * 4:
        raise ValueError(f"array bytes hold {len(data) - offset} bytes, shape {shape} needs {count * 4}")
    return np.frombuffer(data, dtype=np.float32, count=count, offset=offset).reshape(shape)


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
