"""Grouped matmul (the dropless MoE's expert matmul) against a per-group numpy loop, values and gradients.

The `tiled` path re-tiles the sorted rows per group with index arithmetic, which is exactly where off-by-one
errors hide: empty groups, groups shorter than a tile, M not a multiple of the tile, rows past the groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model.gmm import default_tile, grouped_matmul

K, N = 16, 8

CASES = {  # name: (group_sizes, M, tile); tile 0 = the default_tile heuristic
    "empty_groups": ([0, 5, 0, 7, 0], 12, 4),
    "one_giant_group": ([0, 40, 0, 0], 40, 8),
    "groups_smaller_than_tile": ([3, 2, 5, 1], 11, 16),  # the tile is larger than M too
    "m_not_multiple_of_tile": ([9, 14, 10], 33, 8),
    "single_group": ([20], 20, 8),
    "trailing_rows_zero": ([4, 0, 3, 2], 16, 4),  # sum 9 < M = 16
    "tile_of_one": ([2, 3, 0, 4], 9, 1),
    "default_tile": ([17, 3, 0, 30, 5], 64, 0),  # tile 16, 9 trailing rows
}


def _oracle(lhs, rhs, sizes, cot):
    """out, d(sum(out * cot))/dlhs, .../drhs by a loop over groups (float64)."""
    lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
    out, dl, dr = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for g, s in enumerate(sizes):
        rows = slice(start, start + s)
        out[rows] = lhs[rows] @ rhs[g]
        dl[rows] = cot[rows] @ rhs[g].T
        dr[g] = lhs[rows].T @ cot[rows]
        start += s
    return out, dl, dr


def _inputs(sizes, m, seed=0, dtype=jnp.float32):
    r = np.random.RandomState(seed)
    lhs = jnp.asarray(r.randn(m, K), dtype)
    rhs = jnp.asarray(r.randn(len(sizes), K, N), dtype)
    cot = jnp.asarray(r.randn(m, N), jnp.float32)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), cot


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_per_group_loop(impl, case):
    sizes, m, tile = CASES[case]
    lhs, rhs, gs, cot = _inputs(sizes, m)

    @jax.jit
    def run(lhs, rhs, gs, cot):
        f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl=impl, tile=tile) * cot)  # noqa: E731
        return grouped_matmul(lhs, rhs, gs, impl=impl, tile=tile), *jax.grad(f, argnums=(0, 1))(lhs, rhs)

    out, dl, dr = run(lhs, rhs, gs, cot)
    ref_out, ref_dl, ref_dr = _oracle(lhs, rhs, sizes, cot)
    assert out.shape == (m, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dl), ref_dl, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dr), ref_dr, atol=1e-5, rtol=1e-5)
    if sum(sizes) < m:  # rows past the groups: exactly zero, and no gradient flows into them
        assert not np.asarray(out[sum(sizes):]).any() and not np.asarray(dl[sum(sizes):]).any()


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_bf16_inputs_within_bf16_tolerance(impl):
    """bf16 in, bf16 out, fp32 accumulation: close to the fp32 product of the (rounded) bf16 inputs."""
    sizes, m = [7, 0, 21, 4], 36
    lhs, rhs, gs, _ = _inputs(sizes, m, seed=1, dtype=jnp.bfloat16)
    out = jax.jit(lambda a, b: grouped_matmul(a, b, gs, impl=impl, tile=8))(lhs, rhs)
    assert out.dtype == jnp.bfloat16
    ref = _oracle(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, np.zeros((m, N)))[0]
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=2e-2 * np.abs(ref).max(), rtol=1e-2)
    assert not np.asarray(out[sum(sizes):].astype(jnp.float32)).any()


def test_default_tile_heuristic():
    """The average group size rounded down to a power of two, clamped to [8, 512]."""
    assert default_tile(64, 8) == 8
    assert default_tile(1000, 4) == 128  # 250 -> 128
    assert default_tile(100, 64) == 8  # below the floor
    assert default_tile(10, 64) == 8  # M < G
    assert default_tile(1 << 20, 2) == 512  # the ceiling


def test_unknown_impl_is_an_error():
    lhs, rhs, gs, _ = _inputs([2, 2], 4)
    with pytest.raises(ValueError, match="unknown grouped-matmul impl 'nope'"):
        grouped_matmul(lhs, rhs, gs, impl="nope")
