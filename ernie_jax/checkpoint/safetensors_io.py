"""Reading and writing the safetensors format with numpy only (no torch, bf16 through ml_dtypes).

Format: 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` (plus
`__metadata__`), then the raw little-endian tensor bytes. Reading memory-maps the file, so a tensor is
only read when it is used.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Lazy view of one `.safetensors` file: `keys()`, `shape(k)`, `dtype(k)`, `get(k)` -> np.ndarray."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._data_start = 8 + n
        for k, h in header.items():
            if h.get("dtype") not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {k!r} has unsupported dtype {h.get('dtype')!r}")
            b, e = h["data_offsets"]
            want = int(np.prod(h["shape"], dtype=np.int64)) * _DTYPES[h["dtype"]].itemsize
            if e - b != want or self._data_start + e > size:
                raise SafetensorsError(f"{path}: tensor {k!r} data_offsets {h['data_offsets']} do not fit shape "
                                       f"{h['shape']} / the file size (truncated file?)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _DTYPES[self._header[key]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        h = self._header[key]
        b, e = h["data_offsets"]
        if b == e:
            return np.zeros(h["shape"], _DTYPES[h["dtype"]])
        raw = self._mm[self._data_start + b:self._data_start + e]
        return raw.view(_DTYPES[h["dtype"]]).reshape(h["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array) to `path` in safetensors format, keys sorted as transformers does."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    items = sorted(tensors.items())
    for k, a in items:
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {k!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[k] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in items:
            f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def shard_groups(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Splits keys (in order) into groups of at most `max_bytes` (a larger single tensor gets its own)."""
    groups: list[list[str]] = [[]]
    total = 0
    for k, n in sizes:
        if groups[-1] and total + n > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(k)
        total += n
    return groups
