"""The global sample order: stateless, exact per-block mixing, a fresh permutation per source epoch."""

import numpy as np
import pytest

from ernie_jax.data.order import GlobalOrder, apportion


def test_apportion_exact():
    assert apportion(10, [0.5, 0.3, 0.2]).tolist() == [5, 3, 2]
    assert apportion(7, [1, 1, 1]).sum() == 7
    assert apportion(4096, [0.7, 0.2, 0.1]).tolist() == [2867, 819, 410]


def test_stateless_and_seeded():
    a = GlobalOrder(5, [100, 37], [0.6, 0.4], block=64)
    gs = list(range(500))
    fwd = [a(g) for g in gs]
    b = GlobalOrder(5, [100, 37], [0.6, 0.4], block=64)
    assert [b(g) for g in reversed(gs)] == fwd[::-1]  # any access order, any instance
    c = GlobalOrder(6, [100, 37], [0.6, 0.4], block=64)
    assert [c(g) for g in gs] != fwd


def test_mixing_counts_exact_per_block():
    o = GlobalOrder(0, [1000, 1000, 1000], [0.5, 0.3, 0.2], block=100)
    for j in range(3):
        src = [o.locate(g)[0] for g in range(j * 100, (j + 1) * 100)]
        assert np.bincount(src).tolist() == [50, 30, 20]


def test_each_source_draw_once_then_new_epoch():
    sizes = [50, 13]
    o = GlobalOrder(1, sizes, [0.5, 0.5], block=10)
    draws = {0: [], 1: []}
    for g in range(200):
        s, t = o.locate(g)
        draws[s].append(t)
    for s in (0, 1):
        assert draws[s] == list(range(len(draws[s])))  # the t-th draw of s, in order, none skipped
    recs = [o.record(1, t) for t in range(3 * 13)]
    for e in range(3):
        ep = [r for (ee, r) in recs if ee == e]
        assert sorted(ep) == list(range(13))  # a permutation per epoch
    assert [r for e, r in recs[:13]] != [r for e, r in recs[13:26]]  # reshuffled per epoch


def test_length_with_num_epochs():
    o = GlobalOrder(2, [30, 70], [0.3, 0.7], block=10, num_epochs=1)
    assert o.length == 100
    got = sorted((s, r) for s, e, r in (o(g) for g in range(o.length)))
    assert got == sorted([(0, r) for r in range(30)] + [(1, r) for r in range(70)])
    with pytest.raises(IndexError):
        o(o.length)
    # unbalanced weights: the stream ends when the first source runs out
    u = GlobalOrder(2, [10, 1000], [0.5, 0.5], block=10, num_epochs=1)
    assert 18 <= u.length <= 21 and all(e == 0 for _, e, _ in (u(g) for g in range(u.length)))


def test_weight_too_small_for_block():
    with pytest.raises(ValueError, match="mix_block"):
        GlobalOrder(0, [10, 10], [1.0, 1e-6], block=100)
