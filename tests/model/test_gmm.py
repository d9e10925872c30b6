"""Grouped matmul (the dropless MoE's expert matmul) against a per-group numpy loop, values and gradients.

The `tiled` path re-tiles the sorted rows per group with index arithmetic, which is exactly where off-by-one
errors hide: empty groups, groups shorter than a tile, M not a multiple of the tile, rows past the groups.
`bucketed` picks one of a few layouts (per-group buckets of c rows plus overflow tiles for the rows past c) or
the `tiled` fallback at run time and has its own custom_vjp: every branch is checked, with its tiles unused,
partly and exactly full, at and just past each branch's limit, on random skewed loads, and under vmap.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model.gmm import (bucket_branch, bucket_branches, default_tile, expert_swiglu, grouped_matmul,
                                  overflow_tiles)

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


@functools.partial(jax.jit, static_argnames=("impl", "tile"))
def _run(lhs, rhs, gs, cot, *, impl, tile):
    """out and the gradients of sum(out * cot); compiled once per shape, impl and tile (group sizes are traced)."""
    f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl=impl, tile=tile) * cot)  # noqa: E731
    return grouped_matmul(lhs, rhs, gs, impl=impl, tile=tile), *jax.grad(f, argnums=(0, 1))(lhs, rhs)


def _check_against_oracle(impl, sizes, m, tile):
    lhs, rhs, gs, cot = _inputs(sizes, m)
    out, dl, dr = _run(lhs, rhs, gs, cot, impl=impl, tile=tile)
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


# bucketed: M = 256, G = 8, mean group 32 -> branches (c, n, t) by cost G * c + n * (t + 32) = (40, 2, 16),
# (32, 4, 16), (48, 2, 16), (32, 6, 16), (64, 2, 16) (buckets of c rows, n overflow tiles of t rows), then the tiled
# fallback 5
M_BRANCH = 256
BRANCH_CASES = {  # name: (group_sizes, expected branch)
    "balanced": ([32] * 8, 0),  # every tile unused
    "partial_tile": ([50, 40, 40, 30, 30, 30, 20, 16], 0),  # 10 rows past c = 40
    "two_groups_in_tiles": ([48, 44, 40, 40, 32, 20, 16, 16], 0),  # one partial tile each
    "one_group_over_three_tiles": ([80, 16, 16, 32, 32, 32, 32, 16], 1),  # 3 tiles at c = 40, 3 of 4 at 32
    "tiles_exactly_full": ([96, 0, 32, 32, 32, 32, 32, 0], 1),  # 64 rows past c = 32: 4 whole tiles, empty groups
    "too_many_groups_over": ([44, 44, 44, 44, 40, 24, 16, 0], 2),  # 4 tiles at c = 40, 5 at 32, none at 48
    "six_tiles_at_mean": ([81, 40, 40, 32, 32, 31, 0, 0], 3),  # 3 tiles at 40, 6 at 32, 3 at 48
    "last_bucket": ([90, 64, 40, 40, 22, 0, 0, 0], 4),  # 8 tiles at 32, 4 at 48, 2 at 64
    "trailing_rows": ([50, 0, 30, 20, 0, 10, 0, 0], 0),  # a tile, and sum 110 < M: rows past it are zero
    "skewed_fallback": ([200, 56, 0, 0, 0, 0, 0, 0], 5),  # 9 tiles past c = 64
    "one_giant_group_fallback": ([0, 0, 256, 0, 0, 0, 0, 0], 5),
    "fallback_with_trailing_rows": ([150, 1, 0, 0, 0, 0, 0, 0], 5),
}


def test_bucket_branches():
    assert bucket_branches(M_BRANCH, 8) == ((40, 2, 16), (32, 4, 16), (48, 2, 16), (32, 6, 16), (64, 2, 16))
    # the benchmark's shapes (16384 token-slots): at 64 experts c = mean with G / 2 or 3G / 4 tiles of mean / 8
    # first, at 8 experts c = mean with 4 tiles of 128
    assert bucket_branches(16384, 64) == ((256, 32, 32), (256, 48, 32), (288, 16, 64), (384, 16, 64), (512, 16, 64))
    assert bucket_branches(16384, 8)[0] == (2048, 4, 128)
    assert bucket_branches(10, 1) == ((10, 0, 0),)  # never more than M rows per group, no tiles then
    assert bucket_branches(20, 2) == ((20, 0, 0),)  # c = M (40 rows) beats every tiled branch and ends the list
    assert bucket_branches(12, 5) == ((8, 2, 16), (8, 3, 16), (8, 4, 16))  # tiles never beyond ceil8(M) = 16 rows


def test_overflow_tiles():
    sizes = jnp.asarray([40, 24, 32, 32, 80, 0, 33, 0])
    assert int(overflow_tiles(sizes, 32, 16)) == 1 + 3 + 1  # ceil(8 / 16) + ceil(48 / 16) + ceil(1 / 16)
    assert int(overflow_tiles(sizes, 80, 16)) == 0


@pytest.mark.parametrize("tile", [0, 8])  # the fallback's tile: from shapes (128 here), or the one given
@pytest.mark.parametrize("case", BRANCH_CASES)
def test_bucketed_every_branch(case, tile):
    sizes, branch = BRANCH_CASES[case]
    assert sum(sizes) <= M_BRANCH
    assert int(bucket_branch(jnp.asarray(sizes), bucket_branches(M_BRANCH, 8))) == branch
    _check_against_oracle("bucketed", sizes, M_BRANCH, tile)


def test_bucketed_random_skewed_loads():
    """Dirichlet loads from near-balanced to one hot expert, some with rows past the groups: every branch
    kind gets hit (the test asserts it) and matches the oracle."""
    rng, branches, hit = np.random.RandomState(0), bucket_branches(M_BRANCH, 8), set()
    for alpha in (100.0, 30.0, 10.0, 3.0, 1.0, 0.3):
        for trailing in (0, 37):
            sizes = rng.multinomial(M_BRANCH - trailing, rng.dirichlet([alpha] * 8)).tolist()
            hit.add(int(bucket_branch(jnp.asarray(sizes), branches)))
            _check_against_oracle("bucketed", sizes, M_BRANCH, 0)
    assert {0, len(branches)} <= hit and len(hit) >= 3, hit  # tiles at c = mean, a larger bucket, the fallback


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
    lhs, rhs, gs, cot = _inputs(BRANCH_CASES["balanced"][0], M_BRANCH)
    f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl="bucketed") * cot)  # noqa: E731
    conds = list(_conds(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(lhs, rhs).jaxpr))
    assert sorted(len(c.outvars) for c in conds) == [1, 2]
    assert all(len(c.params["branches"]) == 6 for c in conds)  # 5 branches + the fallback


def test_bucketed_under_vmap():
    """vmap over lhs and group sizes (a batched switch index becomes a select over every branch), and over
    lhs alone with shared group sizes; values and gradients per batch element against the oracle."""
    batch = [BRANCH_CASES[c][0] for c in ("partial_tile", "six_tiles_at_mean", "skewed_fallback")]
    ins = [_inputs(s, M_BRANCH, seed=i) for i, s in enumerate(batch)]
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
    batch = [BRANCH_CASES[c][0] for c in ("partial_tile", "skewed_fallback")]  # branch 0 and the fallback
    ins = [_inputs(s, M_BRANCH, seed=i) for i, s in enumerate(batch)]
    rhs = ins[0][1]
    lhs, gs, cot = (jnp.concatenate([x[i] for x in ins]) for i in (0, 2, 3))  # shard i = rows 256i..256i+255

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


# ---------------------------------------------------------------------------------------------- expert_swiglu
# The fused `bucketed` expert SwiGLU (one layout for gate, up, activation and down projection, its own
# custom_vjp) against the three-call path and a dense per-row oracle, values and gradients, in every branch
# kind: tiles unused, partly and exactly full, a larger bucket, the `tiled` fallback, empty groups, and rows past
# sum(group_sizes) (the MoE's slots with the out-of-range expert id E: no group, zero output, no gradient).
I_SW = 8
M_SW = 128  # G = 8, mean group 16 -> branches (24, 2, 16), (16, 4, 16), (32, 2, 16), (16, 6, 16), then the fallback 4
SWIGLU_CASES = {  # name: (group_sizes, expected branch)
    "tile_and_empty_groups": ([40, 24, 0, 16, 16, 16, 8, 8], 0),
    "tiles_trailing_rows": ([60, 3, 0, 0, 0, 0, 0, 0], 1),  # 65 rows past the groups
    "four_groups_over": ([30, 30, 30, 20, 0, 0, 0, 0], 1),
    "larger_bucket": ([0, 0, 90, 0, 0, 0, 1, 0], 3),
    "fallback": ([100, 28, 0, 0, 0, 0, 0, 0], 4),
    "fallback_trailing_rows": ([0, 120, 0, 0, 0, 0, 2, 0], 4),
}


def _swiglu_inputs(sizes, m, seed=0):
    r = np.random.RandomState(seed)
    g = len(sizes)
    x = jnp.asarray(r.randn(m, K), jnp.float32)
    wg, wu = (jnp.asarray(0.3 * r.randn(g, K, I_SW), jnp.float32) for _ in range(2))
    wo = jnp.asarray(0.3 * r.randn(g, I_SW, K), jnp.float32)
    return x, wg, wu, wo, jnp.asarray(sizes, jnp.int32), jnp.asarray(r.randn(m, K), jnp.float32)


def _swiglu_dense(x, wg, wu, wo, sizes):
    """Every row with its own group's weights (gathered per row), rows past the groups zero."""
    row_group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right")
    real = row_group < sizes.shape[0]
    gi = jnp.minimum(row_group, sizes.shape[0] - 1)
    h = jax.nn.silu(jnp.einsum("MK,MKI->MI", x, wg[gi])) * jnp.einsum("MK,MKI->MI", x, wu[gi])
    return jnp.where(real[:, None], jnp.einsum("MI,MIK->MK", h, wo[gi]), 0)


@functools.partial(jax.jit, static_argnames=("fn",))
def _swiglu_run(x, wg, wu, wo, sizes, cot, *, fn):
    """fn's value and the gradients of sum(fn * cot), from one forward (one compile per fn; sizes are traced)."""
    y, vjp = jax.vjp(lambda *a: fn(*a, sizes), x, wg, wu, wo)
    return y, vjp(cot)


_FUSED = functools.partial(expert_swiglu, act=jax.nn.silu, impl="bucketed")
_UNFUSED = functools.partial(expert_swiglu, act=jax.nn.silu, impl="bucketed", fused=False)


@pytest.mark.parametrize("case", SWIGLU_CASES)
def test_expert_swiglu_fused_matches_unfused_and_dense(case):
    sizes, branch = SWIGLU_CASES[case]
    assert int(bucket_branch(jnp.asarray(sizes), bucket_branches(M_SW, 8))) == branch
    args = _swiglu_inputs(sizes, M_SW)
    y, grads = _swiglu_run(*args, fn=_FUSED)
    for ref_fn in (_UNFUSED, _swiglu_dense):
        y_ref, grads_ref = _swiglu_run(*args, fn=ref_fn)
        for got, want in zip((y, *grads), (y_ref, *grads_ref)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    n = sum(sizes)
    if n < M_SW:  # rows past the groups: exactly zero, and no gradient flows into them
        assert not np.asarray(y[n:]).any() and not np.asarray(grads[0][n:]).any()


def test_expert_swiglu_other_impls_are_the_three_calls():
    """Every impl but `bucketed` (and `bucketed` with `fused=False`) is the three-call path (one switch per call
    for bucketed, one in all when fused); tiled against the dense oracle."""
    args = _swiglu_inputs(SWIGLU_CASES["four_groups_over"][0], M_SW, seed=3)
    y_ref, grads_ref = _swiglu_run(*args, fn=_swiglu_dense)
    y, grads = _swiglu_run(*args, fn=functools.partial(expert_swiglu, act=jax.nn.silu, impl="tiled"))
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    x, wg, wu, wo, gs, _ = args
    for impl, fused, switches in (("tiled", True, 0), ("bucketed", False, 3), ("bucketed", True, 1)):
        fn = functools.partial(expert_swiglu, act=jax.nn.silu, impl=impl, fused=fused)
        assert len(list(_conds(jax.make_jaxpr(lambda a: fn(a, wg, wu, wo, gs))(x).jaxpr))) == switches  # noqa: B023


def test_expert_swiglu_fused_switches_carry_gate_and_up_only():
    """One forward switch returning (y, gate, up) for the backward, one backward switch returning the four
    cotangents: the layout is built once per pass, not once per matmul."""
    x, wg, wu, wo, gs, cot = _swiglu_inputs(SWIGLU_CASES["tile_and_empty_groups"][0], M_SW)
    f = lambda *a: jnp.sum(_FUSED(*a, gs) * cot)  # noqa: E731
    conds = list(_conds(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, wg, wu, wo).jaxpr))
    assert sorted(len(c.outvars) for c in conds) == [3, 4]
    assert all(len(c.params["branches"]) == 5 for c in conds)  # 4 branches + the fallback
