"""Builders of `startend_row_indices` (plain JAX, jittable) for the usual training masks.

Inputs are per-token ids [B, S]: `segment_ids` marks packed documents / samples, and every id must form
one contiguous run (a token attends only inside its run). Outputs are int32 [B, 1, S, n] in Paddle's
FlashMask convention (pallas_kernels/flashmask/ops.py), to be passed with the `causal` flag named in each
builder's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """start, end [B, S] int32: the run [start, end) of equal consecutive ids that holds each token."""
    seg = jnp.asarray(segment_ids)
    b, s = seg.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    is_start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    nxt = jnp.concatenate([jnp.where(is_start, pos, s)[:, 1:], jnp.full((b, 1), s, jnp.int32)], axis=1)
    end = jax.lax.cummin(nxt, axis=1, reverse=True)
    return start.astype(jnp.int32), end.astype(jnp.int32)


def _out(*cols) -> jax.Array:
    return jnp.stack(cols, axis=-1)[:, None].astype(jnp.int32)  # [B, 1, S, n]


def _full_segments(batch: int, seq_len: int, segment_ids):
    if segment_ids is None:
        return jnp.zeros((batch, seq_len), jnp.int32)
    return jnp.asarray(segment_ids)


def causal_document_mask(segment_ids: jax.Array) -> jax.Array:
    """Packed documents, causal inside each (causal=True, n=1): key j is seen by rows j..end(j)-1."""
    _, end = segment_bounds(segment_ids)
    return _out(end)


def bidirectional_document_mask(segment_ids: jax.Array) -> jax.Array:
    """Block-diagonal, bidirectional inside each document / frame / image (causal=False, n=2 [LTS, UTE])."""
    start, end = segment_bounds(segment_ids)
    return _out(end, start)


def sliding_window_mask(window: int, *, seq_len: int | None = None, batch: int = 1,
                        segment_ids: jax.Array | None = None, causal: bool = True) -> jax.Array:
    """Each query sees the keys at distance < `window` (itself included), inside its document.

    causal=True (n=1): keys i - window < j <= i. causal=False (n=2 [LTS, UTE]): |i - j| < window."""
    if segment_ids is not None:
        batch, seq_len = segment_ids.shape
    seg = _full_segments(batch, seq_len, segment_ids)
    start, end = segment_bounds(seg)
    j = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    lts = jnp.minimum(end, j + window)
    if causal:
        return _out(lts)
    return _out(lts, jnp.maximum(start, j - window + 1))


def prefix_lm_mask(segment_ids: jax.Array, prefix_mask: jax.Array) -> jax.Array:
    """Prefix-LM per document (causal=False, n=2 [LTS, UTE]): prefix tokens (prefix_mask True) are seen by
    every token of their document (bidirectional prefix); other tokens only by themselves and later tokens
    of the document. Use `prefix_mask = arange(S) < prefix_len[:, None]` for one document per row."""
    start, end = segment_bounds(segment_ids)
    j = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    return _out(end, jnp.where(jnp.asarray(prefix_mask, bool), start, j))


def shared_question_mask(segment_ids: jax.Array, answer_ids: jax.Array) -> jax.Array:
    """One prompt shared by several answers (DPO / reward models), several samples packed (causal=True, n=1).

    segment_ids: the sample of each token; answer_ids: 0 for the shared prompt (at the start of its sample),
    k >= 1 for answer k (contiguous). Prompt keys are seen by the whole rest of their sample; answer keys
    only by the later tokens of the same answer."""
    _, sample_end = segment_bounds(segment_ids)
    # runs of (sample, answer): answers of different samples never merge because samples differ
    _, answer_end = segment_bounds(jnp.asarray(segment_ids) * (jnp.max(answer_ids) + 1) + answer_ids)
    return _out(jnp.where(jnp.asarray(answer_ids) == 0, sample_end, answer_end))


def causal_blockwise_mask(block_ids: jax.Array) -> jax.Array:
    """Causal blocks where the last block sees everything before it (causal=True, n=2 [LTS, LTE]): a key in
    block k < last is seen by rows of block k (causally) and by the last block, masked in between."""
    start, end = segment_bounds(block_ids)
    last_start = jnp.max(start, axis=1, keepdims=True)
    in_last = start == last_start
    s = block_ids.shape[1]
    return _out(end, jnp.where(in_last, s, last_start))


def global_sliding_window_mask(window: int, num_global: int, *, seq_len: int, batch: int = 1,
                               causal: bool = False) -> jax.Array:
    """The first `num_global` tokens are global: they see every key and every query sees them; the others
    see keys at distance < `window`.

    causal=False (n=4 [LTS, LTE, UTS, UTE]); causal=True (n=1): the same under causality."""
    j = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    glob = j < num_global
    s = jnp.full_like(j, seq_len)
    lts = jnp.where(glob, s, jnp.minimum(j + window, seq_len))
    if causal:
        return _out(lts)
    ute = jnp.where(glob, 0, jnp.maximum(num_global, j - window + 1))
    uts = jnp.where(glob, 0, num_global)
    return _out(lts, s, uts, ute)
