"""Helpers for the data pipeline tests."""

import json
from pathlib import Path

import numpy as np

from ernie_jax.data import DataConfig, SourceConfig


def text_config(corpus, **kw) -> DataConfig:
    base = dict(sources=(SourceConfig(path=str(corpus["train"])),), tokenizer=str(corpus["tokenizer"]),
                seq_len=32, global_batch_size=8, max_docs_per_row=8, seed=3)
    base.update(kw)
    return DataConfig(**base)


def take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def same_bytes(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                     and x[k].tobytes() == y[k].tobytes() for k in x) for x, y in zip(a, b))


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return path


def concat_rows(per_process: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in per_process]) for k in per_process[0]}
