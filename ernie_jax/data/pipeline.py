"""`make_pipeline`: the REEAO-style pipeline. Read + tokenize on Grain, pack globally, slice per process.

Stages:
1. **Read** (a Grain `MapDataset`, optionally `mp_prefetch`ed over workers): block k holds the documents
   with global indices [start + k*D, start + (k+1)*D); each document is `GlobalOrder(g)` → (source, epoch,
   record) → raw bytes → text/ids → tokens (+ bos/eos), validated. The stage is one-to-one and stateless,
   so Grain's strict round-robin over workers returns the same blocks for any worker count.
2. **Pack** (in the consuming process, after `mp_prefetch`, as Grain's docs advise for stateful steps):
   `pack_global_batch` packs global batch b from the carried-over chunks and the next documents. It sees no
   process ids, so every process computes the same global batch.
3. **Slice**: process p of P takes rows [p*R/P, (p+1)*R/P) of the R = `global_batch_size` rows.

State (JSON, identical on every process, valid for any process count): the config fingerprint, the next
global batch, the next global sample index, the carried-over chunks as (g, chunk) pairs (their tokens are
re-read on restore), and the skip counters. Restoring rebuilds stage 1 from the saved sample index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data.config import DataConfig, DataConfigError, as_data_config
from ernie_jax.data.order import GlobalOrder
from ernie_jax.data.packing import Chunk, chunks_of, materialize, pack_global_batch
from ernie_jax.data.sources import DataError, decode_record, open_source
from ernie_jax.data.tokenizer import SentencePieceTokenizer

STATE_VERSION = 1
KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "sample_ids")
_ERNIE_BOS, _ERNIE_EOS = 1, 2


class DocLoader:
    """Global sample index → validated token ids (picklable; sources reopen lazily in workers)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.sources = [open_source(s) for s in cfg.sources]
        self.tokenizer = SentencePieceTokenizer(cfg.tokenizer) if cfg.tokenizer else None
        tv = self.tokenizer.vocab_size if self.tokenizer else None
        self.vocab_size = cfg.vocab_size or tv
        if self.vocab_size is None:
            raise DataConfigError("pre-tokenized sources without a tokenizer need `vocab_size`")
        self.bos = self.tokenizer.bos_id if self.tokenizer and self.tokenizer.bos_id >= 0 else _ERNIE_BOS
        self.eos = self.tokenizer.eos_id if self.tokenizer and self.tokenizer.eos_id >= 0 else _ERNIE_EOS
        self.order = GlobalOrder(cfg.seed, [len(s) for s in self.sources], [s.weight for s in cfg.sources],
                                 block=cfg.mix_block, num_epochs=cfg.num_epochs)

    def where(self, g: int) -> tuple[str, int, int]:
        """g → (source path, epoch, record index)."""
        s, e, r = self.order(g)
        return self.cfg.sources[s].path, e, r

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

    def load(self, g: int) -> tuple[np.ndarray | None, str | None]:
        """(tokens, None), or in skip mode (None, kind of error)."""
        try:
            return self.tokens(g), None
        except DataError as e:
            if self.cfg.on_bad_record == "skip":
                return None, e.kind
            raise


class ReadBlock:
    """Stage-1 element k: the documents [start + k*D, min(start + (k+1)*D, end)) as flat arrays."""

    def __init__(self, loader: DocLoader, start: int, per: int, end: int | None):
        self.loader, self.start, self.per, self.end = loader, start, per, end

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        g0 = self.start + int(k) * self.per
        g1 = g0 + self.per if self.end is None else min(g0 + self.per, self.end)
        toks, lens, kinds = [], [], []
        for g in range(g0, g1):
            t, kind = self.loader.load(g)
            toks.append(t if t is not None else np.zeros(0, np.int32))
            lens.append(-1 if t is None else len(t))
            kinds.append(kind or "")
        return {"g0": np.int64(g0), "lengths": np.asarray(lens, np.int64),
                "tokens": np.concatenate(toks) if toks else np.zeros(0, np.int32),
                "kinds": np.asarray(kinds, dtype="U16")}


_ENDLESS_BLOCKS = 1 << 40


def _doc_stream(loader: DocLoader, start: int, cfg: DataConfig):
    """A Grain iterator of stage-1 blocks from global index `start`."""
    import grain
    end = loader.order.length
    per = cfg.docs_per_read
    nblocks = _ENDLESS_BLOCKS if end is None else max(0, -(-(end - start) // per))
    ds = grain.MapDataset.range(nblocks).map(ReadBlock(loader, start, per, end))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=max(1, 2 * cfg.read_threads)))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                           per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(ids)


def _ensure_absl_flags_parsed() -> None:
    """Grain workers read absl flags; outside an absl app they are unparsed (jax-stack-probe §2e)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _dataset_iterator_base():
    import grain
    return grain.DatasetIterator


class PipelineIterator(_dataset_iterator_base()):
    """Per-process iterator over the packed global batches; a Grain `DatasetIterator` (so
    `grain.checkpoint.CheckpointSave/Restore` and Orbax v1 checkpointables work) with a global state."""

    def __init__(self, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        super().__init__()
        if not 0 <= process_index < process_count:
            raise DataConfigError(f"process_index {process_index} outside [0, process_count={process_count})")
        if cfg.global_batch_size % process_count:
            raise DataConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                                  f"process_count {process_count}")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.loader = DocLoader(cfg)
        self._fingerprint = cfg.fingerprint()
        per = cfg.global_batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self._next_batch, self._next_g = 0, 0
        self._carry: list[Chunk] = []
        self._skipped: dict[str, int] = {}
        self._stream = None
        self._block: dict | None = None
        self._block_pos = 0
        self._block_offsets = None
        self._ended = False

    # -- the document stream ------------------------------------------------------------------------
    def _open_stream(self):
        if self._stream is None:
            self._stream = _doc_stream(self.loader, self._next_g, self.cfg)
            self._block = None

    def _close_stream(self):
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        self._stream, self._block = None, None

    def _next_doc(self):
        end = self.loader.order.length
        if end is not None and self._next_g >= end:
            return None
        self._open_stream()
        if self._block is None or self._block_pos >= len(self._block["lengths"]):
            self._block = next(self._stream)
            self._block_pos = 0
            lens = np.maximum(self._block["lengths"], 0)
            self._block_offsets = np.concatenate([[0], np.cumsum(lens)])
            assert int(self._block["g0"]) == self._next_g, (int(self._block["g0"]), self._next_g)
        i = self._block_pos
        self._block_pos += 1
        g = self._next_g
        self._next_g += 1
        n = int(self._block["lengths"][i])
        if n < 0:
            kind = str(self._block["kinds"][i])
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return g, None
        a = int(self._block_offsets[i])
        return g, self._block["tokens"][a:a + n]

    # -- iteration ------------------------------------------------------------------------------------
    def __next__(self) -> dict[str, np.ndarray]:
        if self._ended:
            raise StopIteration
        cfg = self.cfg
        batch, carry = pack_global_batch(self._carry, self._next_doc, seq_len=cfg.seq_len,
                                         rows=cfg.global_batch_size, max_docs=cfg.max_docs_per_row,
                                         lookahead=cfg.pack_lookahead)
        if not any(batch.rows):
            self._ended = True
            self._close_stream()
            raise StopIteration
        self._carry = carry
        self._next_batch += 1
        return materialize(batch, self._rows, seq_len=cfg.seq_len, max_docs=cfg.max_docs_per_row,
                           pad_id=cfg.pad_id)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "seed": self.cfg.seed,
            "next_batch": self._next_batch,
            "next_sample": self._next_g,
            "carry": [[int(c.g), int(c.k)] for c in self._carry],
            "skipped": dict(sorted(self._skipped.items())),
            "ended": self._ended,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data pipeline state of version {STATE_VERSION}: {state!r:.200}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(f"the saved data state belongs to another data config (fingerprint "
                             f"{state['fingerprint']}, this config {self._fingerprint}): resuming would change "
                             "the sample stream")
        self._close_stream()
        self._next_batch, self._next_g = int(state["next_batch"]), int(state["next_sample"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._ended = bool(state["ended"])
        carry = []
        for g, k in state["carry"]:
            carry.append(chunks_of(int(g), self.loader.tokens(int(g)), self.cfg.seq_len)[int(k)])
        self._carry = carry

    def metrics(self) -> dict[str, int]:
        """Counters for logging: skipped bad records (total and per kind), progress."""
        m = {"data/skipped_records": sum(self._skipped.values()),
             "data/global_batch": self._next_batch, "data/next_sample": self._next_g}
        m.update({f"data/skipped_{k}": v for k, v in self._skipped.items()})
        return m

    def start_prefetch(self) -> None:
        if not self._ended:
            self._open_stream()

    def close(self) -> None:
        self._close_stream()

    def __del__(self):
        try:
            self._close_stream()
        except Exception:  # noqa: BLE001
            pass

    def __str__(self) -> str:
        return f"PipelineIterator(process {self.process_index}/{self.process_count}, batch {self._next_batch})"


def make_pipeline(data_config: Any = None, *, process_index: int = 0, process_count: int = 1
                  ) -> PipelineIterator:
    """The per-process iterator over packed global batches (see the module doc).

    `data_config`: a `DataConfig`, a dict for `DataConfig.from_dict`, or None for the embedded default data
    (generated on first use). Each item is a dict of numpy arrays, for R = global_batch_size /
    process_count rows: `tokens`, `targets`, `segment_ids`, `positions`, `loss_mask` [R, seq_len] int32 and
    `sample_ids` [R, max_docs_per_row] int64. `get_state()` / `set_state()` round-trip a JSON-able dict that
    restores under any `process_count`.
    """
    if data_config is None:
        from ernie_jax.data.synthetic import default_data_config
        data_config = default_data_config()
    return PipelineIterator(as_data_config(data_config), process_index, process_count)
