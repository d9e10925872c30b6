"""Data pipeline configuration: the sources, their mixing weights, tokenizer, packing and loader knobs.

Every field that changes the global sample stream (sources (file name and size), weights, seed, seq_len,
global_batch_size, packing knobs, bos/eos, the tokenizer's bytes) is part of `DataConfig.fingerprint()`,
which a saved iterator state carries; a state restored under a config with a different fingerprint is an
error. The loader knobs (`worker_count`, `read_threads`, buffers) and `process_index` / `process_count` are
*not* part of it: they never change the stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

FORMATS = ("jsonl", "arrayrecord")
KINDS = ("text", "ids", "chat", "preference")
ON_BAD = ("raise", "skip")


class DataConfigError(ValueError):
    """An invalid data config."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One source: a JSONL or ArrayRecord file of text (tokenized on the fly), pre-tokenized ids, chat
    conversations (`kind="chat"`, for `ernie_jax.posttrain.chat_pipeline`) or preference pairs
    (`kind="preference"`: objects with "chosen" and "rejected" conversations, `posttrain.preference_pipeline`).

    JSONL: one JSON object per line; text lives under `field` (default "text"), ids under `field` (default
    "ids", a list of ints), a conversation under `field` (default "messages", a list of {"role", "content"}). ArrayRecord: each record is UTF-8 text (`kind="text"`), little-endian int32 ids
    (`kind="ids"`), or a JSON object like a JSONL line (`record_format="json"`).
    """
    path: str
    format: str = "jsonl"            # "jsonl" | "arrayrecord"
    kind: str = "text"               # "text" | "ids"
    field: str | None = None         # JSON field; default "text" / "ids"
    record_format: str = "raw"       # ArrayRecord only: "raw" (utf-8 text or int32 LE ids) | "json"
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataConfigError(f"source {self.path}: format {self.format!r} not in {FORMATS}")
        if self.kind not in KINDS:
            raise DataConfigError(f"source {self.path}: kind {self.kind!r} not in {KINDS}")
        if self.record_format not in ("raw", "json"):
            raise DataConfigError(f"source {self.path}: record_format {self.record_format!r} not in ('raw', 'json')")
        if not (self.weight > 0):
            raise DataConfigError(f"source {self.path}: weight must be > 0, got {self.weight}")
        if self.kind in ("chat", "preference") and self.format == "arrayrecord" and self.record_format != "json":
            raise DataConfigError(f"source {self.path}: a {self.kind} source's ArrayRecord records must be JSON "
                                  "(record_format='json')")

    @property
    def json_field(self) -> str:
        return self.field or ("messages" if self.kind == "chat" else self.kind)

    @property
    def display_name(self) -> str:
        return self.name or os.path.basename(self.path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: tuple[SourceConfig, ...]
    tokenizer: str | None = None      # sentencepiece .model; needed by text sources
    vocab_size: int | None = None     # ids must be < this; default: the tokenizer's vocab size
    seq_len: int = 256
    global_batch_size: int = 32       # rows of seq_len per global batch (all processes together)
    max_docs_per_row: int = 32        # width of `sample_ids`; also a packing limit
    seed: int = 0
    num_epochs: int | None = None     # None: endless; else the stream ends when any source runs out
    add_bos: bool = True
    add_eos: bool = True
    pad_id: int = 0
    on_bad_record: str = "raise"      # "raise" | "skip" (skip-and-count; the order of the rest is unchanged)
    pack_lookahead: int = 16          # max chunks carried over to the next global batch
    mix_block: int = 4096             # mixing granularity: each block of this many samples has exact counts
    # Loader knobs (do not change the stream):
    worker_count: int = 0             # Grain multiprocessing workers for reading + tokenizing
    worker_buffer_size: int = 4
    read_threads: int = 0             # Grain in-process read threads (0: synchronous)
    docs_per_read: int = 64           # documents per element of the read stage

    def __post_init__(self):
        if not self.sources:
            raise DataConfigError("data config has no sources")
        for name in ("seq_len", "global_batch_size", "max_docs_per_row", "pack_lookahead", "mix_block",
                     "docs_per_read", "worker_buffer_size"):
            if int(getattr(self, name)) < 1:
                raise DataConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_count < 0 or self.read_threads < 0:
            raise DataConfigError("worker_count and read_threads must be >= 0")
        if self.on_bad_record not in ON_BAD:
            raise DataConfigError(f"on_bad_record {self.on_bad_record!r} not in {ON_BAD}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataConfigError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
        if any(s.kind in ("text", "chat", "preference") for s in self.sources) and not self.tokenizer:
            raise DataConfigError("a text, chat or preference source needs `tokenizer` (a sentencepiece .model "
                                  "path)")
        if not 0 <= self.seed < 2**63:
            raise DataConfigError(f"seed must be in [0, 2**63), got {self.seed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataConfigError(f"unknown data config keys {sorted(unknown)}; known: {sorted(known)}")
        srcs = d.get("sources", ())
        if isinstance(srcs, (str, Mapping, SourceConfig)):
            srcs = [srcs]
        d["sources"] = tuple(_source(s) for s in srcs)
        return cls(**d)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def _stream_fields(self) -> dict[str, Any]:
        """The fields that define the global stream (all but the loader knobs), JSON-able."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("worker_count", "worker_buffer_size", "read_threads", "docs_per_read")}

    def fingerprint(self) -> str:
        """A hash of everything that defines the global stream (not the loader knobs)."""
        stream = self._stream_fields()
        # a source is identified by its file name and size, not its directory: a checkpoint restores
        # against a copy of the data elsewhere
        stream["sources"] = [dict(s, path=os.path.basename(s["path"]), size=_size(s["path"]))
                             for s in stream["sources"]]
        if self.tokenizer:
            stream["tokenizer"] = _file_digest(self.tokenizer)
        return hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16]


def _source(s: Any) -> SourceConfig:
    if isinstance(s, SourceConfig):
        return s
    if isinstance(s, str):
        return SourceConfig(path=s, format="arrayrecord" if s.endswith((".array_record", ".arrayrecord")) else "jsonl")
    if isinstance(s, Mapping):
        known = {f.name for f in dataclasses.fields(SourceConfig)}
        unknown = set(s) - known
        if unknown:
            raise DataConfigError(f"unknown source keys {sorted(unknown)}; known: {sorted(known)}")
        return SourceConfig(**s)
    raise DataConfigError(f"a source must be a path, a dict or a SourceConfig, got {type(s).__name__}")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise FileNotFoundError(f"data source {path}: {e.strerror or e}") from e


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError as e:
        raise FileNotFoundError(f"tokenizer model {path}: {e.strerror or e}") from e


def as_data_config(data_config: Any) -> DataConfig:
    if isinstance(data_config, DataConfig):
        return data_config
    if isinstance(data_config, Mapping):
        return DataConfig.from_dict(data_config)
    raise DataConfigError(f"data_config must be a DataConfig or a dict, got {type(data_config).__name__}")
