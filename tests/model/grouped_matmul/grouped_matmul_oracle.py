"""The definition of the grouped matmul as a per-group numpy loop in float64 (values and gradients), the
inputs the tests share, and the checks of every implementation against it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.model.grouped_matmul import grouped_matmul

K, N = 16, 8


def oracle(lhs, rhs, sizes, cot):
    """out, d(sum(out * cot))/dlhs, .../drhs by a loop over groups (float64); rows past the groups zero."""
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


def inputs(sizes, m, seed=0, dtype=jnp.float32):
    """lhs [m, K], rhs [G, K, N], group sizes [G] int32, a cotangent [m, N]."""
    r = np.random.RandomState(seed)
    lhs = jnp.asarray(r.randn(m, K), dtype)
    rhs = jnp.asarray(r.randn(len(sizes), K, N), dtype)
    cot = jnp.asarray(r.randn(m, N), jnp.float32)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), cot


@functools.partial(jax.jit, static_argnames=("impl", "tile"))
def _run(lhs, rhs, gs, cot, *, impl, tile):
    """out and the gradients of sum(out * cot); compiled once per shape, impl and tile (group sizes are traced)."""
    f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl=impl, tile=tile) * cot)  # noqa: E731
    return grouped_matmul(lhs, rhs, gs, impl=impl, tile=tile), *jax.grad(f, argnums=(0, 1))(lhs, rhs)


def check_against_oracle(impl, sizes, m, tile=0, atol=1e-5):
    """`grouped_matmul(impl=impl)`'s value and gradients equal the loop's; rows past the groups exactly zero."""
    lhs, rhs, gs, cot = inputs(sizes, m)
    out, dl, dr = _run(lhs, rhs, gs, cot, impl=impl, tile=tile)
    ref_out, ref_dl, ref_dr = oracle(lhs, rhs, sizes, cot)
    assert out.shape == (m, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dl), ref_dl, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dr), ref_dr, atol=atol, rtol=1e-5)
    if sum(sizes) < m:  # rows past the groups: exactly zero, and no gradient flows into them
        assert not np.asarray(out[sum(sizes):]).any() and not np.asarray(dl[sum(sizes):]).any()


def check_bf16(impl):
    """bf16 in, bf16 out, fp32 accumulation: close to the fp32 product of the (rounded) bf16 inputs."""
    sizes, m = [7, 0, 21, 4], 36
    lhs, rhs, gs, _ = inputs(sizes, m, seed=1, dtype=jnp.bfloat16)
    out = jax.jit(lambda a, b: grouped_matmul(a, b, gs, impl=impl, tile=8))(lhs, rhs)
    assert out.dtype == jnp.bfloat16
    ref = oracle(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, np.zeros((m, N)))[0]
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=2e-2 * np.abs(ref).max(), rtol=1e-2)
    assert not np.asarray(out[sum(sizes):].astype(jnp.float32)).any()


# name: (group_sizes, M, tile); tile 0 = the default_tile heuristic. Where index arithmetic hides off-by-ones.
CASES = {
    "empty_groups": ([0, 5, 0, 7, 0], 12, 4),
    "one_giant_group": ([0, 40, 0, 0], 40, 8),
    "groups_smaller_than_tile": ([3, 2, 5, 1], 11, 16),  # the tile is larger than M too
    "m_not_multiple_of_tile": ([9, 14, 10], 33, 8),
    "single_group": ([20], 20, 8),
    "trailing_rows_zero": ([4, 0, 3, 2], 16, 4),  # sum 9 < M = 16
    "tile_of_one": ([2, 3, 0, 4], 9, 1),
    "default_tile": ([17, 3, 0, 30, 5], 64, 0),  # tile 16, 9 trailing rows
}


def conds(jaxpr):
    """Every `cond` equation in a jaxpr and its sub-jaxprs (a `lax.switch` is one)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns"):
                    yield from conds(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from conds(sub.jaxpr)
