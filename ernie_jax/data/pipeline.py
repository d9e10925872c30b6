"""`make_pipeline`: the REEAO-style pipeline. Read + tokenize on Grain, pack globally, slice per process.

The three stages (`stream.py`, `iterator.py`) with text documents:
1. **Read**: each document is `GlobalOrder(g)` → (source, epoch, record) → raw bytes → text/ids → tokens
   (+ bos/eos), validated.
2. **Pack**: `pack_global_batch` packs global batch b from the carried-over chunks and the next documents.
3. **Slice**: process p of P takes rows [p*R/P, (p+1)*R/P) of the R = `global_batch_size` rows.

State: see `iterator.py`; the carry is saved as (g, chunk) pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data import stream
from ernie_jax.data.config import DataConfigError, as_data_config
from ernie_jax.data.iterator import PackedIterator
from ernie_jax.data.packing import Chunk, PackedBatch, chunks_of, materialize, pack_global_batch
from ernie_jax.data.sources import DataError, decode_record
from ernie_jax.data.stream import Loader
from ernie_jax.data.tokenizer import SentencePieceTokenizer

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "sample_ids")
_ERNIE_BOS, _ERNIE_EOS = 1, 2


class DocLoader(Loader[np.ndarray]):
    """Global sample index → validated token ids (picklable; sources reopen lazily in workers)."""

    def _prepare(self) -> None:
        cfg = self.cfg
        post = [f"{s.path} ({s.kind})" for s in cfg.sources if s.kind in ("chat", "preference")]
        if post:
            raise DataConfigError(f"sources {post} need the post-training pipelines (ernie_jax.posttrain: "
                                  "make_chat_pipeline, make_preference_pipeline), not make_pipeline")
        self.tokenizer = SentencePieceTokenizer(cfg.tokenizer) if cfg.tokenizer else None
        tv = self.tokenizer.vocab_size if self.tokenizer else None
        self.vocab_size = cfg.vocab_size or tv
        if self.vocab_size is None:
            raise DataConfigError("pre-tokenized sources without a tokenizer need `vocab_size`")
        self.bos = self.tokenizer.bos_id if self.tokenizer and self.tokenizer.bos_id >= 0 else _ERNIE_BOS
        self.eos = self.tokenizer.eos_id if self.tokenizer and self.tokenizer.eos_id >= 0 else _ERNIE_EOS

    def tokens(self, g: int) -> np.ndarray:
        """The document's tokens; DataError (naming file and record) for bad input."""
        s, _, r = self.order(g)
        scfg, src = self.cfg.sources[s], self.sources[s]
        val = decode_record(src[r], scfg, r)
        if isinstance(val, str):
            if not val:
                raise DataError(scfg.path, r, "empty document", "empty")
            ids = self.tokenizer.encode(val).astype(np.int64)
        else:
            ids = val
        if len(ids) == 0:
            raise DataError(scfg.path, r, "empty document", "empty")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(scfg.path, r, f"token id {int(ids[i])} at position {i} is outside "
                            f"[0, vocab_size={self.vocab_size})", "vocab")
        parts = ([[self.bos]] if self.cfg.add_bos else []) + [ids] + ([[self.eos]] if self.cfg.add_eos else [])
        out = np.concatenate(parts).astype(np.int32)
        if len(out) < 2:
            raise DataError(scfg.path, r, "document has fewer than 2 tokens (nothing to predict)", "empty")
        return out

    document = tokens


class ReadBlock(stream.ReadBlock[np.ndarray]):
    """Stage-1 element: the documents' token counts and their tokens, concatenated."""

    def layout(self, docs: list[np.ndarray | None]) -> stream.Block:
        real = [t for t in docs if t is not None]
        return {"lengths": np.asarray([-1 if t is None else len(t) for t in docs], np.int64),
                "tokens": np.concatenate(real) if real else np.zeros(0, np.int32)}

    @staticmethod
    def offsets(block: stream.Block) -> dict[str, np.ndarray]:
        return {"tokens": np.concatenate([[0], np.cumsum(np.maximum(block["lengths"], 0))])}

    @staticmethod
    def document(g: int, block: stream.Block, i: int, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts["tokens"]


class PipelineIterator(PackedIterator):
    """Per-process iterator over the packed global batches; a Grain `DatasetIterator` (so
    `grain.checkpoint.CheckpointSave/Restore` and Orbax v1 checkpointables work) with a global state."""

    loader_type = DocLoader
    read_block = ReadBlock
    loader: DocLoader
    _carry: list[Chunk]

    def _pack(self) -> tuple[PackedBatch, list[Chunk]]:
        cfg = self.cfg
        return pack_global_batch(self._carry, self._next_doc, seq_len=cfg.seq_len, rows=cfg.global_batch_size,
                                 max_docs=cfg.max_docs_per_row, lookahead=cfg.pack_lookahead)

    def _materialize(self, batch: PackedBatch) -> dict[str, np.ndarray]:
        cfg = self.cfg
        return materialize(batch, self._rows, seq_len=cfg.seq_len, max_docs=cfg.max_docs_per_row,
                           pad_id=cfg.pad_id)

    def _save_carry(self) -> list:
        return [[int(c.g), int(c.k)] for c in self._carry]

    def _load_carry(self, saved: list) -> list[Chunk]:
        return [chunks_of(int(g), self.loader.tokens(int(g)), self.cfg.seq_len)[int(k)] for g, k in saved]


def make_pipeline(data_config: Any, *, process_index: int = 0, process_count: int = 1) -> PipelineIterator:
    """The per-process iterator over packed global batches (see the module doc).

    `data_config`: a `DataConfig` or a dict for `DataConfig.from_dict` (the embedded toy corpus:
    `ernie_jax.synthetic.text.default_data_config()`). Each item is a dict of numpy arrays, for
    R = global_batch_size / process_count rows: `tokens`, `targets`, `segment_ids`, `positions`, `loss_mask`
    [R, seq_len] int32 and `sample_ids` [R, max_docs_per_row] int64. `get_state()` / `set_state()`
    round-trip a JSON-able dict that restores under any `process_count`.
    """
    if data_config is None:
        raise DataConfigError("make_pipeline needs a data config (a DataConfig or a dict); for the embedded toy "
                              "corpus pass ernie_jax.synthetic.text.default_data_config()")
    return PipelineIterator(as_data_config(data_config), process_index, process_count)
