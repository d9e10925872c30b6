"""Mask builders (pallas_kernels.flashmask.masks) against hand-written dense boolean masks, and the tile
statistics against a brute-force count over the dense mask. No kernels run here."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flashmask as fm

SEG = np.repeat(np.arange(5), [7, 1, 12, 3, 9])  # S = 32, ragged documents
S = SEG.size


def _dense(idx, causal, q_len=S):
    return np.asarray(fm.dense_mask(idx, causal=causal, q_len=q_len))[0, 0]


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


def test_paddle_forms_agree():
    """causal [LTS] == causal [LTS, S]; non-causal [LTS, UTE] == [LTS, S, 0, UTE]."""
    r = np.random.RandomState(0)
    a = r.randint(0, S + 1, (2, 3, S, 2))
    one = jnp.asarray(a[..., :1])
    np.testing.assert_array_equal(fm.dense_mask(one, causal=True, q_len=S),
                                  fm.dense_mask(jnp.concatenate([one, jnp.full_like(one, S)], -1), causal=True,
                                                q_len=S))
    two = jnp.asarray(a)
    four = jnp.stack([two[..., 0], jnp.full_like(two[..., 0], S), jnp.zeros_like(two[..., 0]), two[..., 1]], -1)
    np.testing.assert_array_equal(fm.dense_mask(two, causal=False, q_len=S), fm.dense_mask(four, causal=False, q_len=S))


def _brute_tiles(allowed, bq, bk):
    """[B, H, Sq, Sk] -> (any, all) per tile, padding excluded."""
    b, h, sq, sk = allowed.shape
    nq, nk = -(-sq // bq), -(-sk // bk)
    any_ = np.zeros((b, h, nq, nk), bool)
    all_ = np.zeros((b, h, nq, nk), bool)
    for qi in range(nq):
        for ki in range(nk):
            t = allowed[:, :, qi * bq:(qi + 1) * bq, ki * bk:(ki + 1) * bk]
            any_[:, :, qi, ki] = t.any((-1, -2))
            all_[:, :, qi, ki] = t.all((-1, -2))
    return any_, all_


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
        any_, all_ = _brute_tiles(np.asarray(fm.dense_mask(idx, causal=causal, q_len=s)), bq, bk)
        assert st["total"] == any_.size
        assert st["nonempty"] == any_.sum() and st["all_visible"] == all_.sum()
        assert st["computed"] == st["nonempty"], (causal, idx.shape)  # no wasted tile
        assert st["full"] <= st["all_visible"]
        assert st["density"] == pytest.approx(np.asarray(fm.dense_mask(idx, causal=causal, q_len=s)).mean())


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
    any_, all_ = _brute_tiles(np.asarray(fm.dense_mask(idx, causal=causal, q_len=s)), bq, bk)
    assert st["nonempty"] == any_.sum() and st["all_visible"] == all_.sum()
    assert st["computed"] >= st["nonempty"] and st["full"] <= st["all_visible"]
