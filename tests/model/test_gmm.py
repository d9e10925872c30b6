"""Grouped matmul (the dropless MoE's expert matmul) against a per-group numpy loop, values and gradients.

The `tiled` path re-tiles the sorted rows per group with index arithmetic, which is exactly where off-by-one
errors hide: empty groups, groups shorter than a tile, M not a multiple of the tile, rows past the groups.
`bucketed` picks one of several bucket sizes (or the `tiled` fallback) at run time and has its own
custom_vjp: every branch is checked, at and just past each capacity, and under vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model.gmm import bucket_branch, bucket_capacities, default_tile, grouped_matmul

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


@pytest.mark.parametrize("impl", ["tiled", "bucketed", "ragged_dot"])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_per_group_loop(impl, case):
    sizes, m, tile = CASES[case]
    _check_against_oracle(impl, sizes, m, tile)


def _check_against_oracle(impl, sizes, m, tile):
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


@pytest.mark.parametrize("impl", ["tiled", "bucketed", "ragged_dot"])
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


# bucketed: M = 64, G = 4, mean group 16 -> capacities ceil8(1.25, 1.5, 2, 3 x 16) = (24, 32, 48), fallback 3
BRANCH_CASES = {  # name: (group_sizes, expected branch)
    "balanced": ([16, 16, 16, 16], 0),
    "at_first_capacity": ([24, 0, 20, 10], 0),  # max == 24, an empty group, 10 trailing rows
    "past_first_capacity": ([25, 0, 7, 30], 1),  # 30 > 24: second bucket
    "just_past_second": ([33, 31, 0, 0], 2),
    "at_last_capacity": ([0, 0, 16, 48], 2),
    "skewed_fallback": ([0, 60, 0, 4], 3),  # 60 > 48: the tiled fallback
    "one_giant_group_fallback": ([0, 0, 64, 0], 3),
    "fallback_with_trailing_rows": ([50, 1, 0, 0], 3),
}


def test_bucket_capacities():
    assert bucket_capacities(64, 4) == (24, 32, 48)
    assert bucket_capacities(4096, 64) == (80, 96, 128, 192)
    assert bucket_capacities(10, 1) == (10,)  # never more than M rows per group
    assert bucket_capacities(12, 5) == (8,)  # ceil8 of 3, 3.6, 4.8, 7.2: one bucket
    assert bucket_capacities(20, 2) == (16, 20)  # ceil8 of 12.5, 15, 20, 30, capped at M = 20


@pytest.mark.parametrize("tile", [0, 8])  # the fallback's tile: from shapes (64 here), or the one given
@pytest.mark.parametrize("case", BRANCH_CASES)
def test_bucketed_every_branch(case, tile):
    sizes, branch = BRANCH_CASES[case]
    assert int(bucket_branch(jnp.asarray(sizes), bucket_capacities(64, 4))) == branch
    _check_against_oracle("bucketed", sizes, 64, tile)


def _conds(jaxpr):
    """Every `cond` equation in a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns"):
                    yield from _conds(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _conds(sub.jaxpr)


def test_bucketed_switch_carries_no_residuals():
    """The custom_vjp keeps the switches lean: forward returns out, backward (dx, dw), no per-branch residuals."""
    lhs, rhs, gs, cot = _inputs([16, 16, 16, 16], 64)
    f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl="bucketed") * cot)  # noqa: E731
    conds = list(_conds(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(lhs, rhs).jaxpr))
    assert sorted(len(c.outvars) for c in conds) == [1, 2]
    assert all(len(c.params["branches"]) == 4 for c in conds)  # 3 capacities + the fallback


def test_bucketed_under_vmap():
    """vmap over lhs and group sizes (a batched switch index becomes a select over every branch), and over
    lhs alone with shared group sizes; values and gradients per batch element against the oracle."""
    batch = [BRANCH_CASES[c][0] for c in ("at_first_capacity", "past_first_capacity", "skewed_fallback")]
    ins = [_inputs(s, 64, seed=i) for i, s in enumerate(batch)]
    rhs = ins[0][1]
    lhs, gs, cot = (jnp.stack([x[i] for x in ins]) for i in (0, 2, 3))

    def run(a, b, s, c):
        f = lambda a, b: jnp.sum(grouped_matmul(a, b, s, impl="bucketed") * c)  # noqa: E731
        return grouped_matmul(a, b, s, impl="bucketed"), *jax.grad(f, argnums=(0, 1))(a, b)

    for in_axes, sizes in (((0, None, 0, 0), batch), ((0, None, None, 0), [batch[1]] * 3)):
        s = gs if in_axes[2] == 0 else jnp.asarray(sizes[0], jnp.int32)
        out, dl, dr = jax.jit(jax.vmap(run, in_axes=in_axes))(lhs, rhs, s, cot)
        for i, sz in enumerate(sizes):
            ref = _oracle(lhs[i], rhs, sz, cot[i])
            for got, want in zip((out[i], dl[i], dr[i]), ref):
                np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_auto_is_bucketed_off_tpu():
    if jax.default_backend() == "tpu":
        pytest.skip("auto picks ragged_dot on TPU")
    lhs, rhs, gs, _ = _inputs([16, 16, 16, 16], 64)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda a: grouped_matmul(a, rhs, gs))(lhs))


def test_bucketed_in_shard_map_shards_take_different_branches():
    """Inside shard_map (as in expert parallelism) each shard picks its branch from its own group sizes; the
    weights are replicated over the axis, so their gradient is the sum over shards of the per-shard ones."""
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    batch = [BRANCH_CASES[c][0] for c in ("balanced", "skewed_fallback")]  # branch 0 and the fallback
    ins = [_inputs(s, 64, seed=i) for i, s in enumerate(batch)]
    rhs = ins[0][1]
    lhs, gs, cot = (jnp.concatenate([x[i] for x in ins]) for i in (0, 2, 3))  # shard i = rows 64i..64i+63

    def local(a, b, s, c):
        out = grouped_matmul(a, b, s, impl="bucketed")
        return out, jax.lax.psum(jnp.sum(out * c), "x")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P(), P("x"), P("x")), out_specs=(P("x"), P()))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(lhs, P("x")), put(rhs, P()), put(gs, P("x")), put(cot, P("x")))
    out = jax.jit(lambda *a: f(*a)[0])(*args)
    dl, dr = jax.jit(jax.grad(lambda a, b, s, c: f(a, b, s, c)[1], argnums=(0, 1)))(*args)
    refs = [_oracle(x[0], rhs, s, x[3]) for x, s in zip(ins, batch)]
    np.testing.assert_allclose(np.asarray(out), np.concatenate([r[0] for r in refs]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dl), np.concatenate([r[1] for r in refs]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dr), refs[0][2] + refs[1][2], atol=1e-5, rtol=1e-5)
