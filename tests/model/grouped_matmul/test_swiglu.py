"""`expert_swiglu`: the fused `bucketed` expert SwiGLU (one layout for gate, up, activation and down
projection, its own custom_vjp) and the three-call path, values and gradients against a per-group numpy loop
with hand-written gradients, in every branch kind: tiles unused, partly and exactly full, a larger bucket, the
`tiled` fallback, empty groups, and rows past sum(group_sizes) (the MoE's slots with the out-of-range expert id
E: no group, zero output, no gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grouped_matmul_oracle import K, conds

from ernie_jax.model.grouped_matmul import expert_swiglu
from ernie_jax.model.grouped_matmul.bucketed import bucket_branch, bucket_branches

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


def _inputs(sizes, m, seed=0):
    r = np.random.RandomState(seed)
    g = len(sizes)
    x = jnp.asarray(r.randn(m, K), jnp.float32)
    wg, wu = (jnp.asarray(0.3 * r.randn(g, K, I_SW), jnp.float32) for _ in range(2))
    wo = jnp.asarray(0.3 * r.randn(g, I_SW, K), jnp.float32)
    return x, wg, wu, wo, jnp.asarray(sizes, jnp.int32), jnp.asarray(r.randn(m, K), jnp.float32)


def _oracle(x, wg, wu, wo, sizes, cot):
    """y = silu(x @ wg[g]) * (x @ wu[g]) @ wo[g] per group's rows and the gradients of sum(y * cot) by hand,
    a loop over groups in float64; rows past the groups zero."""
    x, wg, wu, wo, cot = (np.asarray(a, np.float64) for a in (x, wg, wu, wo, cot))
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dwg, dwu, dwo = np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wo)
    start = 0
    for g, s in enumerate(np.asarray(sizes)):
        r = slice(start, start + s)
        gate, up = x[r] @ wg[g], x[r] @ wu[g]
        sig = 1 / (1 + np.exp(-gate))
        act = gate * sig
        h = act * up
        y[r] = h @ wo[g]
        dwo[g] = h.T @ cot[r]
        dh = cot[r] @ wo[g].T
        dup, dgate = dh * act, dh * up * sig * (1 + gate * (1 - sig))
        dx[r] = dgate @ wg[g].T + dup @ wu[g].T
        dwg[g], dwu[g] = x[r].T @ dgate, x[r].T @ dup
        start += s
    return y, (dx, dwg, dwu, dwo)


@functools.partial(jax.jit, static_argnames=("fn",))
def _run(x, wg, wu, wo, sizes, cot, *, fn):
    """fn's value and the gradients of sum(fn * cot), from one forward (one compile per fn; sizes are traced)."""
    y, vjp = jax.vjp(lambda *a: fn(*a, sizes), x, wg, wu, wo)
    return y, vjp(cot)


def _check(fn, args, sizes):
    y, grads = _run(*args, fn=fn)
    y_ref, grads_ref = _oracle(*args[:4], sizes, args[5])
    for name, got, want in zip(("y", "dx", "dwg", "dwu", "dwo"), (y, *grads), (y_ref, *grads_ref)):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=name)
    n = sum(sizes)
    if n < args[0].shape[0]:  # rows past the groups: exactly zero, and no gradient flows into them
        assert not np.asarray(y[n:]).any() and not np.asarray(grads[0][n:]).any()


_FUSED = functools.partial(expert_swiglu, act=jax.nn.silu, impl="bucketed")
_UNFUSED = functools.partial(expert_swiglu, act=jax.nn.silu, impl="bucketed", fused=False)


@pytest.mark.parametrize("case", SWIGLU_CASES)
def test_fused_matches_per_group_loop(case):
    sizes, branch = SWIGLU_CASES[case]
    assert int(bucket_branch(jnp.asarray(sizes), bucket_branches(M_SW, 8))) == branch
    _check(_FUSED, _inputs(sizes, M_SW), sizes)


@pytest.mark.parametrize("case", ["tile_and_empty_groups", "fallback_trailing_rows"])
def test_unfused_matches_per_group_loop(case):
    sizes = SWIGLU_CASES[case][0]
    _check(_UNFUSED, _inputs(sizes, M_SW, seed=2), sizes)


def test_other_impls_are_the_three_calls():
    """Every impl but `bucketed` (and `bucketed` with `fused=False`) is the three-call path (one switch per call
    for bucketed, one in all when fused); tiled against the loop."""
    sizes = SWIGLU_CASES["four_groups_over"][0]
    args = _inputs(sizes, M_SW, seed=3)
    _check(functools.partial(expert_swiglu, act=jax.nn.silu, impl="tiled"), args, sizes)
    x, wg, wu, wo, gs, _ = args
    for impl, fused, switches in (("tiled", True, 0), ("bucketed", False, 3), ("bucketed", True, 1)):
        fn = functools.partial(expert_swiglu, act=jax.nn.silu, impl=impl, fused=fused)
        assert len(list(conds(jax.make_jaxpr(lambda a: fn(a, wg, wu, wo, gs))(x).jaxpr))) == switches  # noqa: B023


def test_fused_switches_carry_gate_and_up_only():
    """One forward switch returning (y, gate, up) for the backward, one backward switch returning the four
    cotangents: the layout is built once per pass, not once per matmul."""
    x, wg, wu, wo, gs, cot = _inputs(SWIGLU_CASES["tile_and_empty_groups"][0], M_SW)
    f = lambda *a: jnp.sum(_FUSED(*a, gs) * cot)  # noqa: E731
    found = list(conds(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, wg, wu, wo).jaxpr))
    assert sorted(len(c.outvars) for c in found) == [3, 4]
    assert all(len(c.params["branches"]) == 5 for c in found)  # 4 branches + the fallback
