"""Deterministic first-fit packing of documents into the rows of one global batch.

A document of n tokens gives n-1 (input, target) positions. It is cut into chunks of at most `seq_len`
positions (chunk k: inputs `tokens[k*L : k*L+l]`, targets shifted by one), deterministically. Chunks are
placed, in stream order, into the first row (lowest index) with room for the chunk and fewer than
`max_docs` segments. A chunk that fits nowhere is carried over to the next global batch (carried chunks
are placed first there). Pulling documents stops when every row is full or `lookahead` chunks are being
carried. Packing sees the whole global batch and nothing about processes, so every process computes the
same packing and takes its own rows.

Each row: `tokens`, `targets`, `segment_ids` (1, 2, ... per chunk; 0 = padding), `positions` (restart at 0
for every chunk), `loss_mask` (1 on real positions), and `sample_ids [max_docs]` (the chunk's global sample
index per segment, -1 padding).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import numpy as np

U = TypeVar("U")  # a packed unit


class Chunk(NamedTuple):
    g: int              # global sample index of the document
    k: int              # chunk index within the document
    tokens: np.ndarray  # the whole document's tokens
    start: int          # first input position
    length: int         # number of positions (≤ seq_len)


def chunks_of(g: int, tokens: np.ndarray, seq_len: int, first: int = 0) -> list[Chunk]:
    n = len(tokens) - 1
    return [Chunk(g, k, tokens, k * seq_len, min(seq_len, n - k * seq_len))
            for k in range(first, -(-n // seq_len))]


class PackedBatch(NamedTuple):
    rows: list[list[Chunk]]   # per row, chunks in placement order
    num_docs: int             # documents pulled from the stream for this batch


def first_fit(carry: list[U], pull: Callable[[], list[U] | None], cost: Callable[[U], tuple[int, ...]],
              budgets: tuple[int, ...], *, rows: int, max_docs: int, lookahead: int
              ) -> tuple[list[list[U]], int, list[U]]:
    """The placement rule of the module doc for units (chunks, documents) costing `cost(u)` of each per-row
    budget; a row closes when its first budget (positions) is used up or it holds `max_docs` units. `pull()`
    returns the next document's units ([] for a skipped one) or None at the end of the stream. Returns the
    rows, the number of documents pulled and the carried units."""
    free = [[b] * rows for b in budgets]  # free[b][i]: budget b left in row i
    pos = free[0]
    ndoc = [0] * rows
    placed: list[list[U]] = [[] for _ in range(rows)]
    new_carry: list[U] = []
    first_open = 0  # rows before it are closed

    def place(u: U) -> bool:
        nonlocal first_open
        need = cost(u)
        n0, more = need[0], tuple(zip(free[1:], need[1:]))  # positions first: it rules out most rows
        for i in range(first_open, rows):
            if pos[i] >= n0 and ndoc[i] < max_docs and all(f[i] >= n for f, n in more):
                placed[i].append(u)
                for f, n in zip(free, need):
                    f[i] -= n
                ndoc[i] += 1
                while first_open < rows and (pos[first_open] == 0 or ndoc[first_open] >= max_docs):
                    first_open += 1
                return True
        return False

    for u in carry:
        if not place(u):
            new_carry.append(u)
    num_docs = 0
    while first_open < rows and len(new_carry) < lookahead:
        units = pull()
        if units is None:
            break
        num_docs += 1
        for u in units:
            if not place(u):
                new_carry.append(u)
    return placed, num_docs, new_carry


def pack_global_batch(carry: list[Chunk], next_doc: Callable[[], tuple[int, np.ndarray | None] | None], *,
                      seq_len: int, rows: int, max_docs: int, lookahead: int
                      ) -> tuple[PackedBatch, list[Chunk]]:
    """Packs one global batch. `next_doc()` returns (g, tokens) or (g, None) for a skipped document, or
    None at the end of the stream. Returns the batch and the chunks carried to the next one."""
    def pull() -> list[Chunk] | None:
        d = next_doc()
        return None if d is None else [] if d[1] is None else chunks_of(d[0], d[1], seq_len)

    placed, num_docs, new_carry = first_fit(carry, pull, lambda c: (c.length,), (seq_len,), rows=rows,
                                            max_docs=max_docs, lookahead=lookahead)
    return PackedBatch(placed, num_docs), new_carry


def materialize(batch: PackedBatch, row_slice: slice, *, seq_len: int, max_docs: int, pad_id: int
                ) -> dict[str, np.ndarray]:
    """The arrays of rows `row_slice` of a packed global batch."""
    rows = batch.rows[row_slice]
    n = len(rows)
    out = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.int32),
        "sample_ids": np.full((n, max_docs), -1, np.int64),
    }
    ar = np.arange(seq_len, dtype=np.int32)
    for r, chunks in enumerate(rows):
        o = 0
        for j, c in enumerate(chunks):
            e = o + c.length
            out["tokens"][r, o:e] = c.tokens[c.start:c.start + c.length]
            out["targets"][r, o:e] = c.tokens[c.start + 1:c.start + 1 + c.length]
            out["segment_ids"][r, o:e] = j + 1
            out["positions"][r, o:e] = ar[:c.length]
            out["loss_mask"][r, o:e] = 1
            out["sample_ids"][r, j] = c.g
            o = e
    return out
