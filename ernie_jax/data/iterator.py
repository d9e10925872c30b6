"""`PackedIterator`: stages 2 and 3 of both pipelines and their global state.

2. **Pack** (in the consuming process, after `mp_prefetch`, as Grain's docs advise for stateful steps): the
   subclass packs global batch b from the carried-over units and the next documents of the stage-1 stream
   (`stream.py`). Packing sees no process ids, so every process computes the same global batch.
3. **Slice**: process p of P takes rows [p*R/P, (p+1)*R/P) of the R = `global_batch_size` rows.

State (JSON, identical on every process, valid for any process count): `version`, the subclass's `kind`
(the text pipeline has none: its states predate the field), the config fingerprint, the seed, the next
global batch and sample index, the carry (as the subclass saves it; its tokens are re-read on restore), the
skip counters and whether the stream ended. Restoring rebuilds stage 1 from the saved sample index.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data.config import DataConfig, DataConfigError
from ernie_jax.data.packing import PackedBatch, first_fit
from ernie_jax.data.stream import Loader, ReadBlock, doc_stream

STATE_VERSION = 1


def _dataset_iterator_base():
    import grain
    return grain.DatasetIterator


class PackedIterator(_dataset_iterator_base()):
    """Per-process iterator over packed global batches; a Grain `DatasetIterator` (so
    `grain.checkpoint.CheckpointSave/Restore` and Orbax v1 checkpointables work) with a global state.

    A subclass names its `loader_type` and `read_block` (stage 1) and its state `kind`, and implements `_pack`,
    `_materialize`, `_save_carry` and `_load_carry`."""

    loader_type: type[Loader]
    read_block: type[ReadBlock]
    kind: str | None = None

    def __init__(self, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        super().__init__()
        if not 0 <= process_index < process_count:
            raise DataConfigError(f"process_index {process_index} outside [0, process_count={process_count})")
        if cfg.global_batch_size % process_count:
            raise DataConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                                  f"process_count {process_count}")
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self.loader = self.loader_type(cfg)
        self._fingerprint = cfg.fingerprint()
        per = cfg.global_batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self._next_batch, self._next_g = 0, 0
        self._carry: list = []
        self._skipped: dict[str, int] = {}
        self._stream = None
        self._block: dict | None = None
        self._block_pos = 0
        self._offsets: dict[str, np.ndarray] = {}
        self._ended = False

    # -- what the pipelines differ in ---------------------------------------------------------------------
    def _pack(self) -> tuple[Any, list]:
        """(global batch with `.rows`, new carry) from `self._carry` and `self._next_doc`."""
        raise NotImplementedError

    def _materialize(self, batch: Any) -> dict[str, np.ndarray]:
        """The arrays of this process's rows `self._rows` of `batch`."""
        raise NotImplementedError

    def _save_carry(self) -> list:
        """The carry as JSON."""
        raise NotImplementedError

    def _load_carry(self, saved: list) -> list:
        """The carry from `_save_carry`'s JSON, re-reading the documents."""
        raise NotImplementedError

    # -- the document stream ------------------------------------------------------------------------------
    def _open_stream(self):
        if self._stream is None:
            self._stream = doc_stream(self.read_block, self.loader, self._next_g, self.cfg)
            self._block = None

    def _close_stream(self):
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        self._stream, self._block = None, None

    def _next_doc(self) -> tuple[int, Any] | None:
        """(g, document), (g, None) for a skipped record (counted), or None at the end of the stream."""
        end = self.loader.order.length
        if end is not None and self._next_g >= end:
            return None
        self._open_stream()
        if self._block is None or self._block_pos >= len(self._block["lengths"]):
            b = self._block = next(self._stream)
            self._block_pos = 0
            assert int(b["g0"]) == self._next_g, (int(b["g0"]), self._next_g)
            self._offsets = self.read_block.offsets(b)
        b, i = self._block, self._block_pos
        self._block_pos += 1
        g = self._next_g
        self._next_g += 1
        if b["lengths"][i] < 0:
            kind = str(b["kinds"][i])
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return g, None
        parts = {k: b[k][int(o[i]):int(o[i + 1])] for k, o in self._offsets.items()}
        return g, self.read_block.document(g, b, i, parts)

    # -- iteration ----------------------------------------------------------------------------------------
    def __next__(self) -> dict[str, np.ndarray]:
        if self._ended:
            raise StopIteration
        batch, carry = self._pack()
        if not any(batch.rows):
            self._ended = True
            self._close_stream()
            raise StopIteration
        self._carry = carry
        self._next_batch += 1
        return self._materialize(batch)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **({"kind": self.kind} if self.kind else {}),
            "fingerprint": self._fingerprint,
            "seed": self.cfg.seed,
            "next_batch": self._next_batch,
            "next_sample": self._next_g,
            "carry": self._save_carry(),
            "skipped": dict(sorted(self._skipped.items())),
            "ended": self._ended,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        # without a kind (the text pipeline) none is checked: a foreign state fails on the fingerprint
        if (not isinstance(state, dict) or state.get("version") != STATE_VERSION
                or (self.kind and state.get("kind") != self.kind)):
            what = f"{self.kind} data pipeline" if self.kind else "data pipeline"
            raise ValueError(f"not a {what} state of version {STATE_VERSION}: {state!r:.200}")
        if state["fingerprint"] != self._fingerprint:
            raise ValueError(f"the saved data state belongs to another data config (fingerprint "
                             f"{state['fingerprint']}, this config {self._fingerprint}): resuming would change "
                             "the sample stream")
        self._close_stream()
        self._next_batch, self._next_g = int(state["next_batch"]), int(state["next_sample"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._ended = bool(state["ended"])
        self._carry = self._load_carry(state["carry"])

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
        return f"{type(self).__name__}(process {self.process_index}/{self.process_count}, batch {self._next_batch})"


class WholeDocumentIterator(PackedIterator):
    """A `PackedIterator` whose documents are placed whole, never cut (post-training examples: a reply must see
    its prompt): first fit over the documents, each costing `_positions(doc)` of a row's `seq_len`; the carry
    is the carried documents' global indices (re-read on restore). The subclass lays out `_materialize`."""

    def _positions(self, doc) -> int:
        raise NotImplementedError

    def _pack(self):
        def pull():
            d = self._next_doc()
            return None if d is None else [] if d[1] is None else [d]

        cfg = self.cfg
        rows, num_docs, carry = first_fit(self._carry, pull, lambda u: (self._positions(u[1]),), (cfg.seq_len,),
                                          rows=cfg.global_batch_size, max_docs=cfg.max_docs_per_row,
                                          lookahead=cfg.pack_lookahead)
        return PackedBatch(rows, num_docs), carry  # rows of (global index, document) units

    def _save_carry(self) -> list:
        return [int(g) for g, _ in self._carry]

    def _load_carry(self, saved: list) -> list:
        return [(int(g), self.loader.document(int(g))) for g in saved]
