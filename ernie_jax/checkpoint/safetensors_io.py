"""safetensors files through the `safetensors` library, as numpy arrays (bf16 through ml_dtypes): no torch.

`SafetensorsFile` reads lazily: the header at open, each tensor only when asked. `save_file` is atomic (the
library writes a temporary file beside `path` and renames it). Errors name the file and the tensor.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np
import safetensors
import safetensors.numpy


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Lazy view of one `.safetensors` file: `keys()`, `shape(k)`, `get(k)` -> np.ndarray, `metadata`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._f = safetensors.safe_open(self.path, framework="numpy")
        except (safetensors.SafetensorError, OSError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata = self._f.metadata() or {}
        self._keys = set(self._f.keys())

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def _check_key(self, key: str) -> None:
        if key not in self._keys:
            raise SafetensorsError(f"{self.path}: no tensor {key!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        self._check_key(key)
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        self._check_key(key)
        try:
            return self._f.get_tensor(key)
        except (safetensors.SafetensorError, AttributeError, TypeError) as e:  # e.g. float8: no numpy type
            raise SafetensorsError(f"{self.path}: cannot read tensor {key!r} "
                                   f"({self._f.get_slice(key).get_dtype()}): {e}") from None


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array) to `path`. metadata: default {"format": "pt"}, which transformers
    requires of the files it loads."""
    path = os.fspath(path)
    arrays = {}
    for k, a in tensors.items():
        a = np.asarray(a)
        arrays[k] = a if a.flags.c_contiguous else a.copy(order="C")  # the writer reads the raw buffer
        try:  # the library's own dtype check, here to name the tensor
            safetensors.TensorSpec(dtype=a.dtype.name, shape=a.shape, data_ptr=0, data_len=a.nbytes)
        except safetensors.SafetensorError as e:
            raise SafetensorsError(f"{path}: cannot store tensor {k!r} ({e})") from None
    # the library writes a temporary file and renames it into place, so a failed write leaves no half file
    safetensors.numpy.save_file(arrays, path, metadata=dict(metadata or {"format": "pt"}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # its temporary file is 0600: give the file the mode open() would


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
