"""The `bucketed` grouped matmul against the per-group loop, values and gradients. It picks one of a few
layouts (per-group buckets of c rows plus overflow tiles for the rows past c) or the `tiled` fallback at run
time and has its own custom_vjp: every branch is checked, with its tiles unused, partly and exactly full, at
and just past each branch's limit, on random skewed loads, under vmap and inside shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_matmul_oracle import CASES, check_against_oracle, check_bf16, conds, inputs, oracle

from ernie_jax.model.grouped_matmul import grouped_matmul
from ernie_jax.model.grouped_matmul.bucketed import bucket_branch, bucket_branches, overflow_tiles


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_per_group_loop(case):
    sizes, m, tile = CASES[case]
    check_against_oracle("bucketed", sizes, m, tile)


def test_bf16_inputs_within_bf16_tolerance():
    check_bf16("bucketed")


# M = 256, G = 8, mean group 32 -> branches (c, n, t) by cost G * c + n * (t + 32) = (40, 2, 16),
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
def test_every_branch(case, tile):
    sizes, branch = BRANCH_CASES[case]
    assert sum(sizes) <= M_BRANCH
    assert int(bucket_branch(jnp.asarray(sizes), bucket_branches(M_BRANCH, 8))) == branch
    check_against_oracle("bucketed", sizes, M_BRANCH, tile)


def test_random_skewed_loads():
    """Dirichlet loads from near-balanced to one hot expert, some with rows past the groups: every branch
    kind gets hit (the test asserts it) and matches the oracle."""
    rng, branches, hit = np.random.RandomState(0), bucket_branches(M_BRANCH, 8), set()
    for alpha in (100.0, 30.0, 10.0, 3.0, 1.0, 0.3):
        for trailing in (0, 37):
            sizes = rng.multinomial(M_BRANCH - trailing, rng.dirichlet([alpha] * 8)).tolist()
            hit.add(int(bucket_branch(jnp.asarray(sizes), branches)))
            check_against_oracle("bucketed", sizes, M_BRANCH, 0)
    assert {0, len(branches)} <= hit and len(hit) >= 3, hit  # tiles at c = mean, a larger bucket, the fallback


def test_switch_carries_no_residuals():
    """The custom_vjp keeps the switches lean: forward returns out, backward (dx, dw), no per-branch residuals."""
    lhs, rhs, gs, cot = inputs(BRANCH_CASES["balanced"][0], M_BRANCH)
    f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl="bucketed") * cot)  # noqa: E731
    found = list(conds(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(lhs, rhs).jaxpr))
    assert sorted(len(c.outvars) for c in found) == [1, 2]
    assert all(len(c.params["branches"]) == 6 for c in found)  # 5 branches + the fallback


def test_under_vmap():
    """vmap over lhs and group sizes (a batched switch index becomes a select over every branch), and over
    lhs alone with shared group sizes; values and gradients per batch element against the oracle."""
    batch = [BRANCH_CASES[c][0] for c in ("partial_tile", "six_tiles_at_mean", "skewed_fallback")]
    ins = [inputs(s, M_BRANCH, seed=i) for i, s in enumerate(batch)]
    rhs = ins[0][1]
    lhs, gs, cot = (jnp.stack([x[i] for x in ins]) for i in (0, 2, 3))

    def run(a, b, s, c):
        f = lambda a, b: jnp.sum(grouped_matmul(a, b, s, impl="bucketed") * c)  # noqa: E731
        return grouped_matmul(a, b, s, impl="bucketed"), *jax.grad(f, argnums=(0, 1))(a, b)

    for in_axes, sizes in (((0, None, 0, 0), batch), ((0, None, None, 0), [batch[1]] * 3)):
        s = gs if in_axes[2] == 0 else jnp.asarray(sizes[0], jnp.int32)
        out, dl, dr = jax.jit(jax.vmap(run, in_axes=in_axes))(lhs, rhs, s, cot)
        for i, sz in enumerate(sizes):
            ref = oracle(lhs[i], rhs, sz, cot[i])
            for got, want in zip((out[i], dl[i], dr[i]), ref):
                np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_in_shard_map_shards_take_different_branches():
    """Inside shard_map (as in expert parallelism) each shard picks its branch from its own group sizes; the
    weights are replicated over the axis, so their gradient is the sum over shards of the per-shard ones."""
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    batch = [BRANCH_CASES[c][0] for c in ("partial_tile", "skewed_fallback")]  # branch 0 and the fallback
    ins = [inputs(s, M_BRANCH, seed=i) for i, s in enumerate(batch)]
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
    refs = [oracle(x[0], rhs, s, x[3]) for x, s in zip(ins, batch)]
    np.testing.assert_allclose(np.asarray(out), np.concatenate([r[0] for r in refs]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dl), np.concatenate([r[1] for r in refs]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dr), refs[0][2] + refs[1][2], atol=1e-5, rtol=1e-5)
