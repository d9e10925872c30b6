"""Mask builders (pallas_kernels.flashmask.masks) against hand-written dense boolean masks, the package's dense
reference mask and its tile statistics against a brute-force count, all through the test's own reading of
`startend_row_indices` (flashmask_oracle.py). No kernels run here."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flashmask_oracle import dense_mask, tile_occupancy
from pallas_kernels import flashmask as fm

SEG = np.repeat(np.arange(5), [7, 1, 12, 3, 9])  # S = 32, ragged documents
S = SEG.size


def _dense(idx, causal, q_len=S):
    return dense_mask(idx, causal=causal, q_len=q_len)[0, 0]


def _hand(rule):
    return np.array([[rule(i, j) for j in range(S)] for i in range(S)], bool)


def test_causal_document():
    want = _hand(lambda i, j: j <= i and SEG[i] == SEG[j])
    np.testing.assert_array_equal(_dense(fm.causal_document_mask(jnp.asarray(SEG[None])), True), want)


def test_bidirectional_document():
    want = _hand(lambda i, j: SEG[i] == SEG[j])
    np.testing.assert_array_equal(_dense(fm.bidirectional_document_mask(jnp.asarray(SEG[None])), False), want)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    w = 4
    want = _hand(lambda i, j: (j <= i or not causal) and abs(i - j) < w and SEG[i] == SEG[j])
    got = _dense(fm.sliding_window_mask(w, segment_ids=jnp.asarray(SEG[None]), causal=causal), causal)
    np.testing.assert_array_equal(got, want)
    plain = _hand(lambda i, j: (j <= i or not causal) and abs(i - j) < w)
    np.testing.assert_array_equal(_dense(fm.sliding_window_mask(w, seq_len=S, causal=causal), causal), plain)


def test_prefix_lm():
    prefix = np.array([p < 3 for p in np.concatenate([np.arange(n) for n in [7, 1, 12, 3, 9]])])
    want = _hand(lambda i, j: SEG[i] == SEG[j] and (j <= i or prefix[j]))
    got = _dense(fm.prefix_lm_mask(jnp.asarray(SEG[None]), jnp.asarray(prefix[None])), False)
    np.testing.assert_array_equal(got, want)


def test_shared_question():
    sample = np.repeat([0, 1], [20, 12])
    answer = np.repeat([0, 1, 2, 3, 0, 1, 2], [5, 6, 4, 5, 3, 4, 5])
    want = _hand(lambda i, j: j <= i and sample[i] == sample[j] and (answer[j] == 0 or answer[i] == answer[j]))
    got = _dense(fm.shared_question_mask(jnp.asarray(sample[None]), jnp.asarray(answer[None])), True)
    np.testing.assert_array_equal(got, want)


def test_causal_blockwise():
    blocks = np.repeat([0, 1, 2, 3], [8, 6, 10, 8])
    last = blocks.max()
    want = _hand(lambda i, j: j <= i and (blocks[i] == blocks[j] or blocks[i] == last))
    got = _dense(fm.causal_blockwise_mask(jnp.asarray(blocks[None])), True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_global_sliding_window(causal):
    w, g = 3, 4
    want = _hand(lambda i, j: (j <= i or not causal) and (abs(i - j) < w or j < g or (i < g and not causal)))
    got = _dense(fm.global_sliding_window_mask(w, g, seq_len=S, causal=causal), causal)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal,n", [(True, 1), (True, 2), (False, 2), (False, 4)])
@pytest.mark.parametrize("sq", [S, 20, 45])
def test_dense_reference_follows_the_definition(causal, n, sq):
    """The package's dense mask (the kernels' oracle) for every Paddle form, Sq = Sk and not, random bounds."""
    r = np.random.RandomState(n + 10 * causal + sq)
    a = r.randint(0, max(sq, S) + 1, (2, 3, S, n))
    if n > 1:  # mostly ordered pairs; some empty (reversed) intervals left in
        a[..., :2] = np.where(r.rand(2, 3, S, 1) < 0.8, np.sort(a[..., :2], -1), a[..., :2])
    got = np.asarray(fm.dense_mask(jnp.asarray(a, jnp.int32), causal=causal, q_len=sq))
    np.testing.assert_array_equal(got, dense_mask(a, causal=causal, q_len=sq))


def _builders(s):
    seg = jnp.asarray(np.repeat(np.arange(4), [s // 2, s // 8, s // 8, s - s // 2 - 2 * (s // 8)])[None])
    return [
        (fm.causal_document_mask(seg), True), (fm.bidirectional_document_mask(seg), False),
        (fm.sliding_window_mask(s // 5, seq_len=s), True), (fm.sliding_window_mask(s // 5, seq_len=s, causal=False), False),
        (fm.prefix_lm_mask(seg, jnp.asarray(np.arange(s) < s // 4)[None]), False),
        (fm.global_sliding_window_mask(s // 6, 8, seq_len=s), False),
        (fm.global_sliding_window_mask(s // 6, 8, seq_len=s, causal=True), True),
        (fm.causal_blockwise_mask(seg), True),
        (jnp.full((1, 1, s, 1), s, jnp.int32), True),  # plain causal
    ]


@pytest.mark.parametrize("bq,bk", [(16, 16), (16, 32), (24, 8)])
def test_tile_statistics_exact_for_builders(bq, bk):
    s = 100  # not a multiple of the blocks
    for idx, causal in _builders(s):
        st = fm.tile_statistics(idx, causal=causal, q_len=s, block_q=bq, block_kv=bk)
        allowed = dense_mask(idx, causal=causal, q_len=s)
        any_, all_ = tile_occupancy(allowed, bq, bk)
        assert st["total"] == any_.size
        assert st["nonempty"] == any_.sum() and st["all_visible"] == all_.sum()
        assert st["computed"] == any_.sum(), (causal, idx.shape)  # no wasted tile
        assert st["full"] <= all_.sum()
        assert st["density"] == pytest.approx(allowed.mean())


@pytest.mark.parametrize("causal,n", [(True, 1), (True, 2), (False, 2), (False, 4)])
def test_tile_statistics_never_skip_a_visible_tile(causal, n):
    """Random intervals: the min/max test is conservative (may compute an empty tile), never wrong."""
    s, bq, bk = 90, 16, 32
    r = np.random.RandomState(n)
    a = np.sort(r.randint(0, s + 1, (2, 2, s, n)), -1) if n > 1 else r.randint(0, s + 1, (2, 2, s, 1))
    if n == 4:
        a = np.concatenate([np.sort(a[..., :2], -1), np.sort(a[..., 2:], -1)], -1)
    idx = jnp.asarray(a, jnp.int32)
    st = fm.tile_statistics(idx, causal=causal, q_len=s, block_q=bq, block_kv=bk)
    any_, all_ = tile_occupancy(dense_mask(idx, causal=causal, q_len=s), bq, bk)
    assert st["nonempty"] == any_.sum() and st["all_visible"] == all_.sum()
    assert st["computed"] >= any_.sum() and st["full"] <= all_.sum()
