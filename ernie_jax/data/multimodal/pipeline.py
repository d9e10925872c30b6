"""`make_multimodal_pipeline`: the text pipeline's guarantees for interleaved text + image records.

The three stages (`data/stream.py`, `data/iterator.py`) with multimodal documents:
1. **Read**: each document is `GlobalOrder(g)` -> (source, epoch, record) -> raw JSON ->
   `DocumentEncoder.document` (tokenize, decode + preprocess images, check the row budgets).
2. **Pack** (consuming process): `pack_mm_global_batch`, first fit under seq_len, max_patches_per_row,
   max_images_per_row and max_docs_per_row together; documents are never split.
3. **Slice**: process p of P takes rows [p*R/P, (p+1)*R/P) of the R = `global_batch_size` rows.

State: see `data/iterator.py`; `kind` "multimodal", the carry saved as the documents' global indices. Batch
layout: see `packing.py`. No 3D position ids: the model derives them from `mm_token_type_ids`,
`image_grid_thw` and `segment_ids`; `positions` (1D, restarting per document) is kept for code shared with
the text pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data import stream
from ernie_jax.data.config import DataConfigError
from ernie_jax.data.iterator import PackedIterator
from ernie_jax.data.multimodal.config import MultimodalDataConfig
from ernie_jax.data.multimodal.document import DocumentEncoder, MMDocument
from ernie_jax.data.multimodal.packing import MMPackedBatch, materialize_mm, pack_mm_global_batch
from ernie_jax.data.stream import Loader

MM_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "sample_ids", "mm_token_type_ids",
           "moe_mm_token_type_ids", "pixel_values", "image_grid_thw")


class MMDocLoader(Loader[MMDocument]):
    """Global sample index -> `MMDocument` (picklable; sources reopen lazily in workers)."""

    cfg: MultimodalDataConfig

    def _prepare(self) -> None:
        self.encoder = DocumentEncoder(self.cfg)

    def document(self, g: int) -> MMDocument:
        s, _, r = self.order(g)
        return self.encoder.document(g, self.sources[s][r], self.cfg.sources[s].path, r)


class MMReadBlock(stream.ReadBlock[MMDocument]):
    """Stage-1 element: per document its token, patch and image counts and answer start; tokens, patches and
    grids concatenated."""

    loader: MMDocLoader

    def layout(self, docs: list[MMDocument | None]) -> stream.Block:
        real = [d for d in docs if d is not None]
        width = 3 * self.loader.cfg.patch_size ** 2
        return {
            "lengths": np.array([-1 if d is None else len(d.tokens) for d in docs], np.int64),
            "answer_start": np.array([0 if d is None else d.answer_start for d in docs], np.int64),
            "num_patches": np.array([0 if d is None else len(d.patches) for d in docs], np.int64),
            "num_images": np.array([0 if d is None else len(d.grids) for d in docs], np.int64),
            "tokens": np.concatenate([d.tokens for d in real]) if real else np.zeros(0, np.int32),
            "patches": np.concatenate([d.patches for d in real]) if real else np.zeros((0, width), np.float32),
            "grids": np.concatenate([d.grids for d in real]) if real else np.zeros((0, 3), np.int32),
        }

    @staticmethod
    def offsets(block: stream.Block) -> dict[str, np.ndarray]:
        return {k: np.concatenate([[0], np.cumsum(v)]) for k, v in
                (("tokens", np.maximum(block["lengths"], 0)), ("patches", block["num_patches"]),
                 ("grids", block["num_images"]))}

    @staticmethod
    def document(g: int, block: stream.Block, i: int, parts: dict[str, np.ndarray]) -> MMDocument:
        return MMDocument(g, parts["tokens"], int(block["answer_start"][i]), parts["patches"], parts["grids"])


class MultimodalPipelineIterator(PackedIterator):
    """Per-process iterator over packed multimodal global batches; a Grain `DatasetIterator` with a global
    JSON state (`get_state` / `set_state`), like `PipelineIterator`."""

    loader_type = MMDocLoader
    read_block = MMReadBlock
    kind = "multimodal"
    cfg: MultimodalDataConfig
    loader: MMDocLoader
    _carry: list[MMDocument]

    def _pack(self) -> tuple[MMPackedBatch, list[MMDocument]]:
        cfg = self.cfg
        return pack_mm_global_batch(
            self._carry, self._next_doc, seq_len=cfg.seq_len, max_patches=cfg.max_patches_per_row,
            max_images=cfg.max_images_per_row, rows=cfg.global_batch_size, max_docs=cfg.max_docs_per_row,
            lookahead=cfg.pack_lookahead)

    def _materialize(self, batch: MMPackedBatch) -> dict[str, np.ndarray]:
        cfg = self.cfg
        return materialize_mm(batch, self._rows, seq_len=cfg.seq_len, max_docs=cfg.max_docs_per_row,
                              max_patches=cfg.max_patches_per_row, max_images=cfg.max_images_per_row,
                              patch_dim=3 * cfg.patch_size ** 2, pad_id=cfg.pad_id,
                              special=self.loader.encoder.special, answer_only=cfg.answer_only_loss)

    def _save_carry(self) -> list:
        return [int(d.g) for d in self._carry]

    def _load_carry(self, saved: list) -> list[MMDocument]:
        return [self.loader.document(int(g)) for g in saved]


def make_multimodal_pipeline(data_config: MultimodalDataConfig | dict[str, Any], *, process_index: int = 0,
                             process_count: int = 1) -> MultimodalPipelineIterator:
    """The per-process iterator over packed multimodal global batches (see the module doc; layout in
    `packing.py`): per item, for R = global_batch_size / process_count rows, `tokens`, `targets`,
    `segment_ids`, `positions`, `loss_mask`, `mm_token_type_ids`, `moe_mm_token_type_ids` int32 [R, S],
    `sample_ids` int64 [R, max_docs_per_row], `pixel_values` fp32 [R, P, 3*patch^2], `image_grid_thw` int32
    [R, N, 3]."""
    if isinstance(data_config, dict):
        data_config = MultimodalDataConfig.from_dict(data_config)
    if not isinstance(data_config, MultimodalDataConfig):
        raise DataConfigError(f"data_config must be a MultimodalDataConfig or a dict, got {type(data_config).__name__}")
    return MultimodalPipelineIterator(data_config, process_index, process_count)

