"""Deterministic first-fit packing of multimodal documents under three budgets per row.

The text packer's rule (`data/packing.py`) with whole documents and three budgets: a document (n tokens -> n - 1
positions, p patches, k images) goes, in stream order, into the first row (lowest index) with at least
n - 1 free positions, p free patch slots, k free image slots and fewer than `max_docs` documents; one that
fits nowhere is carried over to the next global batch (carried documents are placed first there). Pulling
stops when every row is closed (no free position or `max_docs` documents) or `lookahead` documents are being
carried. Packing sees the whole global batch and nothing about processes.

Row layout (`materialize_mm`), for R rows, S = seq_len, P = max_patches, N = max_images:
- `tokens`, `targets`, `segment_ids` (1, 2, ... per document; 0 padding), `positions` (restart at 0 per
  document), `loss_mask`, `mm_token_type_ids`, `moe_mm_token_type_ids`: int32 [R, S]; padding is `pad_id`
  / 0. `loss_mask` is 1 where the target is a text token (not image start / placeholder / end) and, with
  `answer_only`, at or after the document's answer start.
- `sample_ids` int64 [R, max_docs]: the document's global sample index per segment, -1 padding.
- `pixel_values` fp32 [R, P, 3*patch^2]: the row's images' patches in order of appearance from slot 0;
  `image_grid_thw` int32 [R, N, 3]: their (1, gh, gw); unused slots / grid rows are zero.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ernie_jax.data.multimodal.document import MMDocument
from ernie_jax.data.packing import first_fit
from ernie_jax.processor import SpecialTokens, type_ids


class MMPackedBatch(NamedTuple):
    rows: list[list[MMDocument]]   # per row, documents in placement order
    num_docs: int                  # documents pulled from the stream for this batch


def pack_mm_global_batch(carry: list[MMDocument], next_doc: Callable[[], tuple[int, MMDocument | None] | None], *,
                         seq_len: int, max_patches: int, max_images: int, rows: int, max_docs: int, lookahead: int
                         ) -> tuple[MMPackedBatch, list[MMDocument]]:
    """Packs one global batch. `next_doc()` returns (g, document), (g, None) for a skipped record, or None at
    the end of the stream. Every document must fit an empty row. Returns the batch and the carried documents."""
    def pull() -> list[MMDocument] | None:
        d = next_doc()
        return None if d is None else [] if d[1] is None else [d[1]]

    placed, num_docs, new_carry = first_fit(carry, pull, lambda d: (d.length, len(d.patches), len(d.grids)),
                                            (seq_len, max_patches, max_images), rows=rows, max_docs=max_docs,
                                            lookahead=lookahead)
    return MMPackedBatch(placed, num_docs), new_carry


def materialize_mm(batch: MMPackedBatch, row_slice: slice, *, seq_len: int, max_docs: int, max_patches: int,
                   max_images: int, patch_dim: int, pad_id: int, special: SpecialTokens, answer_only: bool
                   ) -> dict[str, np.ndarray]:
    """The arrays of rows `row_slice` of a packed global batch (layout in the module doc)."""
    rows = batch.rows[row_slice]
    n = len(rows)
    out = {k: np.zeros((n, seq_len), np.int32) for k in
           ("tokens", "targets", "segment_ids", "positions", "loss_mask", "mm_token_type_ids", "moe_mm_token_type_ids")}
    out["tokens"][:] = pad_id
    out["targets"][:] = pad_id
    out["sample_ids"] = np.full((n, max_docs), -1, np.int64)
    out["pixel_values"] = np.zeros((n, max_patches, patch_dim), np.float32)
    out["image_grid_thw"] = np.zeros((n, max_images, 3), np.int32)
    ar = np.arange(seq_len, dtype=np.int32)
    for r, docs in enumerate(rows):
        o = po = io = 0
        for j, d in enumerate(docs):
            e, L = o + d.length, d.length
            mm, moe = type_ids(d.tokens, special)
            out["tokens"][r, o:e] = d.tokens[:-1]
            out["targets"][r, o:e] = d.tokens[1:]
            out["segment_ids"][r, o:e] = j + 1
            out["positions"][r, o:e] = ar[:L]
            out["mm_token_type_ids"][r, o:e] = mm[:-1]
            out["moe_mm_token_type_ids"][r, o:e] = moe[:-1]
            loss = moe[1:] == 0  # no loss on predicting image start / placeholder / end tokens
            if answer_only:
                loss &= np.arange(1, L + 1) >= d.answer_start
            out["loss_mask"][r, o:e] = loss
            out["sample_ids"][r, j] = d.g
            out["pixel_values"][r, po:po + len(d.patches)] = d.patches
            out["image_grid_thw"][r, io:io + len(d.grids)] = d.grids
            o, po, io = e, po + len(d.patches), io + len(d.grids)
    return out
