"""Random-access record sources: JSONL (with a byte-offset index file) and ArrayRecord.

`JsonlSource(path)[i]` returns the raw bytes of line i in O(1): the first use writes `<path>.idx`, a `.npy`
array `[file_size, offset_0, ..., offset_n]` (memory-mapped afterwards). A stale index (the file's size
changed) is an error, never a silent re-index. `ArrayRecordSource` wraps `grain.sources.ArrayRecordDataSource`
(ArrayRecord files carry their own record index). `decode_record` turns raw bytes into text or int32 ids.
Every failure raises `DataError` naming the file and the record index.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading

import numpy as np

from ernie_jax.data.config import SourceConfig


class DataError(ValueError):
    """A bad input record or file; `path` and `record` (or None) say where."""

    def __init__(self, path: str, record: int | None, reason: str, kind: str = "error"):
        self.path, self.record, self.reason, self.kind = path, record, reason, kind
        where = f"{path}" if record is None else f"{path}: record {record}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # survives pickling from Grain workers
        return DataError, (self.path, self.record, self.reason, self.kind)


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data source {path}: no such file")


def build_jsonl_index(path: str) -> np.ndarray:
    """`[file_size, offset_0, ..., offset_{n-1}, end]`: record i is bytes [offset_i, offset_{i+1}) minus "\\n"."""
    size = os.path.getsize(path)
    starts = [np.zeros(1, np.uint64)]
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.uint64)
            starts.append(nl + np.uint64(pos + 1))
            pos += len(chunk)
    offs = np.concatenate(starts)
    if offs[-1] != size:  # no trailing newline: the last (possibly truncated) line is still a record
        offs = np.append(offs, np.uint64(size))
    return np.concatenate([np.array([size], np.uint64), offs])


class JsonlSource:
    """Random access to the lines of a JSONL file through `<path>.idx`."""

    def __init__(self, path: str, index_path: str | None = None):
        _require_file(path)
        self.path = path
        self.index_path = index_path or path + ".idx"
        self._index = self._load_index()
        self._fd = None
        self._pid = None
        self._lock = threading.Lock()

    def _load_index(self) -> np.ndarray:
        size = os.path.getsize(self.path)
        if os.path.exists(self.index_path):
            try:
                idx = np.load(self.index_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(self.index_path, None, f"unreadable record index ({e}); delete it to rebuild") from e
            if idx.ndim != 1 or len(idx) < 2 or int(idx[0]) != size:
                built = int(idx[0]) if len(idx) else "?"
                raise DataError(self.path, None, f"record index {self.index_path} is stale (it was built for a "
                                f"file of {built} bytes, the file has {size}); delete it to rebuild")
            return idx
        idx = build_jsonl_index(self.path)
        try:  # atomic write; an unwritable directory keeps the index in memory
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.index_path)), suffix=".idx.tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, idx)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.index_path)
            return np.load(self.index_path, mmap_mode="r")
        except OSError:
            return idx

    def __len__(self) -> int:
        return len(self._index) - 2

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: record {i} out of range [0, {len(self)})")
        if self._fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        a, b = int(self._index[i + 1]), int(self._index[i + 2])
        data = os.pread(self._fd, b - a, a)
        if len(data) != b - a:
            raise DataError(self.path, i, f"truncated: read {len(data)} of {b - a} bytes (file shrank?)", "truncated")
        return data[:-1] if data.endswith(b"\n") else data

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = d["_pid"] = None
        d["_lock"] = None
        d["_index"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
        self._index = self._load_index()

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class ArrayRecordSource:
    """Random access to an ArrayRecord file (its footer holds the record index)."""

    def __init__(self, path: str):
        _require_file(path)
        import grain
        self.path = path
        try:
            self._src = grain.sources.ArrayRecordDataSource([path])
            self._len = len(self._src)
        except Exception as e:  # noqa: BLE001 - the reader raises various types for corrupt files
            raise DataError(path, None, f"cannot open as ArrayRecord: {e}", "corrupt") from e

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < self._len:
            raise IndexError(f"{self.path}: record {i} out of range [0, {self._len})")
        try:
            return self._src[i]
        except Exception as e:  # noqa: BLE001
            raise DataError(self.path, i, f"cannot read record: {e}", "corrupt") from e


def open_source(cfg: SourceConfig):
    return JsonlSource(cfg.path) if cfg.format == "jsonl" else ArrayRecordSource(cfg.path)


def decode_record(raw: bytes, cfg: SourceConfig, record: int) -> str | np.ndarray | list:
    """Raw record bytes → text (str), ids (int64 array), a chat conversation (the list under the field) or a
    preference record (the object), the last two checked by their pipelines; DataError on corrupt input,
    naming file and record."""
    if cfg.format == "jsonl" or cfg.record_format == "json":
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(cfg.path, record, f"invalid UTF-8: {e}", "utf8") from e
        except json.JSONDecodeError as e:
            raise DataError(cfg.path, record, f"corrupt or truncated JSON: {e}", "corrupt") from e
        if cfg.kind == "preference":  # the whole object: its "chosen" and "rejected" conversations
            if not isinstance(obj, dict):
                raise DataError(cfg.path, record, "expected a JSON object with 'chosen' and 'rejected'", "corrupt")
            return obj
        if not isinstance(obj, dict) or cfg.json_field not in obj:
            raise DataError(cfg.path, record, f"expected a JSON object with field {cfg.json_field!r}", "corrupt")
        val = obj[cfg.json_field]
        if cfg.kind == "chat":
            if not isinstance(val, list):
                raise DataError(cfg.path, record, f"field {cfg.json_field!r} is not a list of messages", "corrupt")
            return val
        if cfg.kind == "text":
            if not isinstance(val, str):
                raise DataError(cfg.path, record, f"field {cfg.json_field!r} is not a string", "corrupt")
            try:
                val.encode("utf-8")  # JSON \\ud800 escapes decode to lone surrogates: invalid UTF-8
            except UnicodeEncodeError as e:
                raise DataError(cfg.path, record, f"invalid UTF-8 (lone surrogate): {e}", "utf8") from e
            return val
        if not isinstance(val, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in val):
            raise DataError(cfg.path, record, f"field {cfg.json_field!r} is not a list of ints", "corrupt")
        return np.asarray(val, np.int64)
    if cfg.kind == "text":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(cfg.path, record, f"invalid UTF-8: {e}", "utf8") from e
    if len(raw) % 4:
        raise DataError(cfg.path, record, f"{len(raw)} bytes is not a whole number of int32 ids (truncated?)",
                        "truncated")
    return np.frombuffer(raw, "<i4").astype(np.int64)
