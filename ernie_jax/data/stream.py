"""Stage 1 of both pipelines: global sample index -> document -> a Grain stream of blocks of documents.

A `Loader` maps a global index g to `GlobalOrder(g)` -> (source, epoch, record) -> a validated document (token
ids for text, an `MMDocument` for interleaved text + images). `ReadBlock` is the stage's map: block k holds the
documents [start + k*D, min(start + (k+1)*D, end)) as flat arrays, laid out by the subclass, which also cuts
one document back out in the consuming process. The map is one-to-one and stateless, so Grain's strict
round-robin over workers returns the same blocks for any worker count.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import numpy as np

from ernie_jax.data.config import DataConfig
from ernie_jax.data.order import GlobalOrder
from ernie_jax.data.sources import DataError, open_source

Doc = TypeVar("Doc")
_ENDLESS_BLOCKS = 1 << 40


class Loader(Generic[Doc]):
    """Global sample index -> document (picklable; sources reopen lazily in workers)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.sources = [open_source(s) for s in cfg.sources]
        self._prepare()  # between the two, so a config with several faults reports the same one as ever
        self.order = GlobalOrder(cfg.seed, [len(s) for s in self.sources], [s.weight for s in cfg.sources],
                                 block=cfg.mix_block, num_epochs=cfg.num_epochs)

    def _prepare(self) -> None:
        """Sets up what turns a record into a document (tokenizer, encoder)."""

    def document(self, g: int) -> Doc:
        """The document at g; DataError (naming file and record) for a bad record."""
        raise NotImplementedError

    def where(self, g: int) -> tuple[str, int, int]:
        """g -> (source path, epoch, record index)."""
        s, e, r = self.order(g)
        return self.cfg.sources[s].path, e, r

    def load(self, g: int) -> tuple[Doc | None, str | None]:
        """(document, None), or in skip mode (None, kind of error)."""
        try:
            return self.document(g), None
        except DataError as e:
            if self.cfg.on_bad_record == "skip":
                return None, e.kind
            raise


Block = dict[str, np.ndarray]


class ReadBlock(Generic[Doc]):
    """Stage-1 element k: the documents [start + k*D, min(start + (k+1)*D, end)) as flat arrays.

    Every block has "g0" (its first global index), "kinds" (the error kind of a skipped document, else "") and
    "lengths" (tokens per document, -1 for a skipped one); the subclass adds the concatenated arrays (`layout`),
    their per-document extents (`offsets`) and rebuilds a document from its slices (`document`)."""

    def __init__(self, loader: Loader[Doc], start: int, per: int, end: int | None):
        self.loader, self.start, self.per, self.end = loader, start, per, end

    def __call__(self, k: int) -> Block:
        g0 = self.start + int(k) * self.per
        g1 = g0 + self.per if self.end is None else min(g0 + self.per, self.end)
        docs, kinds = [], []
        for g in range(g0, g1):
            d, kind = self.loader.load(g)
            docs.append(d)
            kinds.append(kind or "")
        return {"g0": np.int64(g0), "kinds": np.asarray(kinds, dtype="U16"), **self.layout(docs)}

    def layout(self, docs: list[Doc | None]) -> Block:
        """"lengths" and the concatenated arrays of the documents (None: skipped)."""
        raise NotImplementedError

    @staticmethod
    def offsets(block: Block) -> dict[str, np.ndarray]:
        """Per concatenated array, the start of each document in it and the end of the last."""
        raise NotImplementedError

    @staticmethod
    def document(g: int, block: Block, i: int, parts: dict[str, np.ndarray]) -> Doc:
        """Document i of `block` (global index g), given its slice of every array in `offsets`."""
        raise NotImplementedError


def doc_stream(read_block: type[ReadBlock], loader: Loader, start: int, cfg: DataConfig) -> Any:
    """A Grain iterator of stage-1 blocks from global index `start`."""
    import grain
    end = loader.order.length
    per = cfg.docs_per_read
    nblocks = _ENDLESS_BLOCKS if end is None else max(0, -(-(end - start) // per))
    ds = grain.MapDataset.range(nblocks).map(read_block(loader, start, per, end))
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
