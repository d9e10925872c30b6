"""Grouped matmul Pallas kernels (pallas_kernels.gmm) against `jax.lax.ragged_dot` and numpy loops.

On CPU the kernels run in Pallas interpret mode (~5 ms per grid step plus ~1 s compile per kernel), so the
cases use small shapes and few steps, and each case compiles forward + both backward kernels in one jit.
Tolerances: fp32 1e-5 relative to the output's scale; bf16 operands 2e-2 (bf16 outputs / cotangents).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import ernie_jax
from pallas_kernels.gmm import choose_tiling, gmm, tgmm
from pallas_kernels.gmm import kernel as K
from pallas_kernels.gmm.ops import VMEM_BUDGET, vmem_bytes
from pallas_kernels.gmm.reference import gmm_numpy, gmm_reference, tgmm_numpy, tgmm_reference
from random_weights import random_model


def _close(actual, expected, tol, what=""):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what)


def _operands(m, k, n, g, seed, dtype=jnp.float32, transpose_rhs=False):
    """lhs ~ N(0, 1/K), rhs ~ N(0, 1), cotangent ~ N(0, 1/N): outputs and gradients of order one."""
    rs = np.random.RandomState(seed)
    lhs = jnp.asarray(rs.randn(m, k) / np.sqrt(k), dtype)
    rhs = jnp.asarray(rs.randn(g, n, k) if transpose_rhs else rs.randn(g, k, n), dtype)
    ct = jnp.asarray(rs.randn(m, n) / np.sqrt(n), jnp.float32)
    return lhs, rhs, ct


@functools.partial(jax.jit, static_argnames=("fn",))
def _value_and_vjp(fn, lhs, rhs, ct):
    out, vjp = jax.vjp(fn, lhs, rhs)
    return (out, *vjp(ct.astype(out.dtype)))


def _compare(lhs, rhs, sizes, ct, *, tol, group_offset=0, transpose_rhs=False, out_dtype=jnp.float32, **kw):
    """Our (out, d lhs, d rhs) vs ragged_dot's, one compile each; returns ours."""
    ours = functools.partial(gmm, group_sizes=sizes, group_offset=group_offset, transpose_rhs=transpose_rhs,
                             preferred_element_type=out_dtype, interpret=True, **kw)
    ref = functools.partial(gmm_reference, group_sizes=sizes, group_offset=group_offset,
                            transpose_rhs=transpose_rhs, preferred_element_type=out_dtype)
    got = _value_and_vjp(ours, lhs, rhs, ct)
    want = _value_and_vjp(ref, lhs, rhs, ct)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, a.dtype, b.shape, b.dtype)
        _close(a, b, tol, name)
    return got


# --- oracles, schedule, tiling (no kernels) ---------------------------------------------------------------


def test_reference_oracles_agree():
    """ragged_dot oracle == numpy loop (fp64), with an offset, trailing rows and an empty group."""
    sizes = np.array([3, 0, 5, 2], np.int32)  # 10 of 12 rows
    lhs, rhs, ct = _operands(12, 6, 5, 4, seed=0)
    for off, gl in ((0, 4), (1, 2)):
        r = rhs[:gl]
        _close(gmm_reference(lhs, r, jnp.asarray(sizes), group_offset=off),
               gmm_numpy(lhs, r, sizes, group_offset=off), 1e-6)
        _close(tgmm_reference(lhs.T, ct, jnp.asarray(sizes), group_offset=off, num_local_groups=gl),
               tgmm_numpy(lhs.T, ct, sizes, group_offset=off, num_local_groups=gl), 1e-6)
    assert np.all(np.asarray(gmm_reference(lhs, rhs, jnp.asarray(sizes)))[10:] == 0)


@pytest.mark.parametrize("seed", range(4))
def test_schedule_visits_every_group_tile_once_in_order(seed):
    rs = np.random.RandomState(seed)
    g, tm = rs.randint(1, 9), int(rs.choice([4, 8, 16]))
    sizes = rs.randint(0, 3 * tm, g) * (rs.rand(g) > 0.3)  # empty groups, groups smaller than a tile
    m = int(sizes.sum() + rs.randint(0, 2 * tm))  # trailing rows past sum(group_sizes)
    m = max(m, 1)
    off = rs.randint(0, g)
    gl = rs.randint(1, g - off + 1)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    for visit_empty in (False, True):
        s = K.make_schedule(jnp.asarray(sizes, jnp.int32), jnp.int32(off), m=m, tm=tm, num_local_groups=gl,
                            visit_empty_groups=visit_empty)
        n = int(s.num_steps)
        assert n <= K.max_steps(m, tm, gl) == len(s.step_group)
        visits = list(zip(np.asarray(s.step_group[:n]).tolist(), np.asarray(s.step_tile[:n]).tolist()))
        want = []
        for j in range(gl):
            a, b = starts[off + j], ends[off + j]
            if b > a:
                want += [(j, t) for t in range(a // tm, -(-b // tm))]
            elif visit_empty:
                want.append((j, min(a // tm, -(-m // tm) - 1)))
        assert visits == want  # each (group, tile) once, by group then tile: output tiles revisited consecutively
        np.testing.assert_array_equal(s.group_start, starts[off:off + gl])
        np.testing.assert_array_equal(s.group_end, ends[off:off + gl])


def test_choose_tiling_is_legal_and_fits_vmem():
    for m, k, n, g in [(4096, 2560, 1536, 16), (4096, 1536, 2560, 16), (24576, 2560, 1536, 64), (300, 96, 80, 5),
                       (4096, 8192, 8192, 8), (1000, 1000, 3000, 4), (7, 64, 32, 2)]:
        for dt in (jnp.float32, jnp.bfloat16):
            tm, tk, tn = choose_tiling(m, k, n, num_groups=g, dtype=dt)
            assert tm == m or (tm % 8 == 0 and 128 <= tm <= 512), (m, tm)
            assert all(t == d or t % 128 == 0 for t, d in ((tk, k), (tn, n))), (k, n, tk, tn)
            assert vmem_bytes((tm, tk, tn), jnp.dtype(dt).itemsize, 4) <= VMEM_BUDGET
    assert choose_tiling(4096, 2560, 1536, num_groups=16, dtype=jnp.bfloat16) == (256, 512, 768)  # 21B-A3B / 4
    # interpret mode: whole K and N (grid steps are what cost), tm ~ the average group size
    assert choose_tiling(4096, 2560, 1536, num_groups=16, interpret=True) == (256, 2560, 1536)
    assert choose_tiling(100, 32, 16, num_groups=2, interpret=True) == (64, 32, 16)


def test_illegal_tilings_and_operands_raise():
    lhs, rhs, _ = _operands(64, 256, 128, 2, seed=0)
    sizes = jnp.array([32, 32], jnp.int32)
    with pytest.raises(ValueError, match="not a legal TPU block"):
        gmm(lhs, rhs, sizes, tiling=(64, 256, 64), interpret=False)  # tn not a multiple of 128 nor all of N
    with pytest.raises(ValueError, match="not a legal TPU block"):
        gmm(lhs, rhs, sizes, tiling=(12, 256, 128), interpret=False)  # tm not a multiple of 8
    with pytest.raises(ValueError, match="contracting dims"):
        gmm(lhs, rhs, sizes, transpose_rhs=True)
    with pytest.raises(ValueError, match="only 1"):
        gmm(lhs, rhs, sizes[:1])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gmm(lhs.astype(jnp.float16), rhs, sizes)
    with pytest.raises(ValueError, match="tiling must give"):
        gmm(lhs, rhs, sizes, tiling=lambda m, k, n: None)


# --- kernels against ragged_dot: values and gradients ------------------------------------------------------

# (m, k, n, group sizes, tiling): every case also has rows past sum(group_sizes) unless it fills M.
CASES = {
    # empty groups (first, middle, last), groups smaller than a tile, groups straddling tiles, M and K not
    # multiples of their tiles (ragged last m- and k-tile), 2 n-tiles, 10 trailing zero rows
    "ragged": (203, 96, 256, [0, 5, 60, 0, 3, 1, 90, 34, 0], (64, 64, 128)),
    "one_giant_group": (256, 64, 48, [0, 250, 0, 0], (64, 64, 48)),
    "single_group": (100, 40, 24, [77], (32, 40, 24)),
    "default_tiling": (160, 48, 40, [30, 0, 70, 60], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gmm_fp32_matches_ragged_dot(case):
    m, k, n, sizes, tiling = CASES[case]
    lhs, rhs, ct = _operands(m, k, n, len(sizes), seed=1)
    sizes = jnp.asarray(sizes, jnp.int32)
    out, _, _ = _compare(lhs, rhs, sizes, ct, tol=1e-5, tiling=tiling)
    np.testing.assert_array_equal(np.asarray(out)[int(sizes.sum()):], 0)
    if case == "ragged":  # and the plain definition
        _close(out, gmm_numpy(lhs, rhs, np.asarray(sizes)), 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gmm_random_shapes(seed):
    rs = np.random.RandomState(100 + seed)
    g = int(rs.randint(1, 7))
    m, k, n = (int(x) for x in rs.randint(16, 200, 3))
    sizes = rs.multinomial(int(rs.randint(m // 2, m + 1)), rs.dirichlet(np.ones(g) * 0.5)).astype(np.int32)
    tiling = (int(rs.choice([16, 32, 64])), int(rs.randint(8, k + 1)), int(rs.randint(8, n + 1)))
    lhs, rhs, ct = _operands(m, k, n, g, seed=seed)
    _compare(lhs, rhs, jnp.asarray(sizes), ct, tol=1e-5, tiling=tiling)


def test_gmm_transpose_rhs():
    lhs, rhs, ct = _operands(150, 80, 64, 3, seed=2, transpose_rhs=True)  # rhs [G, N, K]
    _compare(lhs, rhs, jnp.array([40, 0, 100], jnp.int32), ct, tol=1e-5, transpose_rhs=True, tiling=(64, 48, 64))


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_bf16(out_dtype):
    """bf16 operands, fp32 accumulation; bf16 gradients (and a bf16 output) within bf16 tolerance."""
    lhs, rhs, ct = _operands(130, 64, 96, 4, seed=3, dtype=jnp.bfloat16)
    got = _compare(lhs, rhs, jnp.array([20, 70, 0, 33], jnp.int32), ct, tol=2e-2, out_dtype=out_dtype,
                   tiling=(32, 64, 96))
    assert got[1].dtype == got[2].dtype == jnp.bfloat16
    if out_dtype == jnp.float32:  # products of bf16 values are exact in fp32: the forward is fp32-accurate
        _close(got[0], gmm_numpy(lhs.astype(jnp.float32), rhs.astype(jnp.float32), [20, 70, 0, 33]), 1e-5)


def test_group_offset_runs_only_local_groups():
    """rhs holds groups 2..4 of 6: their rows are computed, all others are zero; gradients match."""
    sizes = jnp.array([10, 25, 7, 0, 30, 12], jnp.int32)  # local rows [35, 72)
    lhs, rhs, ct = _operands(96, 32, 40, 3, seed=4)
    out, d_lhs, _ = _compare(lhs, rhs, sizes, ct, tol=1e-5, group_offset=2, tiling=(16, 32, 40))
    rows = np.arange(96)
    outside = (rows < 35) | (rows >= 72)
    assert np.all(np.asarray(out)[outside] == 0) and np.all(np.asarray(d_lhs)[outside] == 0)
    # a traced offset gives the same
    traced = jax.jit(lambda o: gmm(lhs, rhs, sizes, group_offset=o, tiling=(16, 32, 40)))(jnp.int32(2))
    np.testing.assert_array_equal(traced, out)


def test_expert_parallel_shard_map_sums_to_full_gmm():
    """4 shards of 2 experts each (group_offset from axis_index): the psum of the shards' outputs and of their
    d lhs equals the unsharded gmm; each shard's d rhs is its slice of the full one."""
    ep, g = 4, 8
    sizes = jnp.array([9, 0, 14, 3, 20, 0, 7, 11], jnp.int32)
    lhs, rhs, ct = _operands(70, 24, 32, g, seed=5)
    mesh = jax.make_mesh((ep,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:ep])

    def shard(lhs, rhs_local, ct):
        off = jax.lax.axis_index("expert") * rhs_local.shape[0]
        f = lambda a, b: gmm(a, b, sizes, group_offset=off, tiling=(32, 24, 32), interpret=True)  # noqa: E731
        out, vjp = jax.vjp(f, lhs, rhs_local)
        d_lhs, d_rhs = vjp(ct)
        return jax.lax.psum(out, "expert"), jax.lax.psum(d_lhs, "expert"), d_rhs

    # check_vma=False: jax 0.10.2's Pallas interpreter cannot run under the varying-axes check (its grid
    # loop indices are not varying; see ops.gmm). The TPU lowering can: tests/tpu_aot/test_gmm_aot.py.
    run = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("expert"), P()),
                                out_specs=(P(), P(), P("expert")), check_vma=False))
    got = run(lhs, jax.device_put(rhs, NamedSharding(mesh, P("expert"))), ct)
    want = _value_and_vjp(functools.partial(gmm_reference, group_sizes=sizes), lhs, rhs, ct)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        _close(a, b, 1e-5, name)
    checked = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("expert"), P()), out_specs=(P(), P(), P("expert")))
    with pytest.raises(NotImplementedError, match="check_vma=False"):
        jax.jit(checked).lower(lhs, rhs, ct)


def test_tgmm_public_api():
    """tgmm(lhs [K, M], grad [M, N]) per group, empty groups zero, local groups with group_offset."""
    sizes = np.array([0, 17, 40, 0, 23], np.int32)  # 80 of 90 rows
    lhs, _, ct = _operands(90, 36, 20, 5, seed=6)
    gs = jnp.asarray(sizes)
    full, local = jax.jit(lambda a, g: (  # one compile for both kernels
        tgmm(a.T, g, gs, tiling=(32, 36, 20), interpret=True),
        tgmm(a.T, g, gs, group_offset=1, num_local_groups=3, tiling=(32, 36, 20), interpret=True)))(lhs, ct)
    _close(full, tgmm_numpy(lhs.T, ct, sizes), 1e-5)
    assert np.all(np.asarray(full)[[0, 3]] == 0)
    _close(local, tgmm_reference(lhs.T, ct, gs, group_offset=1, num_local_groups=3), 1e-5)


def test_default_interpret_runs_the_interpreter_on_cpu_and_callable_tiling():
    """interpret left at None: eagerly and under jit (where both targets are traced and lowering keeps the
    CPU one), forward and both backward kernels, against the numpy loops. The TPU side of the same default:
    tests/tpu_aot/test_gmm_aot.py."""
    seen = []

    def lut(m, k, n):
        seen.append((m, k, n))
        return (32, 512, 512)  # larger than the dims: clamped

    lhs, rhs, ct = _operands(64, 16, 8, 2, seed=7)
    sizes = jnp.array([30, 34], jnp.int32)
    np_sizes = np.asarray(sizes)
    out = gmm(lhs, rhs, sizes, tiling=lut)
    assert seen == [(64, 16, 8)]  # called once, its tiles serve both targets
    _close(out, gmm_numpy(lhs, rhs, np_sizes), 1e-5)
    assert gmm(lhs[:0], rhs, jnp.zeros(2, jnp.int32)).shape == (0, 8)
    jit_out, d_lhs, d_rhs = _value_and_vjp(functools.partial(gmm, group_sizes=sizes), lhs, rhs, ct)
    _close(jit_out, gmm_numpy(lhs, rhs, np_sizes), 1e-5, "out")
    _close(d_lhs, gmm_numpy(ct, rhs, np_sizes, transpose_rhs=True), 1e-5, "d_lhs")
    _close(d_rhs, tgmm_numpy(lhs.T, ct, np_sizes), 1e-5, "d_rhs")
    _close(jax.jit(lambda a, g: tgmm(a.T, g, sizes))(lhs, ct), tgmm_numpy(lhs.T, ct, np_sizes), 1e-5, "tgmm")


def test_default_interpret_needs_tiles_legal_on_tpu():
    """With interpret=None the call may lower to the Mosaic kernel, so user tiles must be legal TPU blocks
    (checked before tracing); interpret=True takes any positive tiles."""
    lhs, rhs, _ = _operands(64, 256, 256, 2, seed=8)
    sizes = jnp.array([30, 34], jnp.int32)
    with pytest.raises(ValueError, match="not a legal TPU block"):
        gmm(lhs, rhs, sizes, tiling=(12, 256, 256))
    assert gmm(lhs, rhs, sizes, tiling=(12, 256, 256), interpret=True).shape == (64, 256)


# --- the MoE layer: moe_gmm_impl = "pallas" vs "ragged_dot" ----------------------------------------------


def test_moe_layer_pallas_equals_ragged_dot():
    """tiny MoE (8 experts, top-2, one shared expert, one MoE layer): same logits and parameter gradients.
    One set of weights (created once); the pallas model's graph comes from the abstract model."""
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 16)), jnp.int32)
    cfg = ernie_jax.get_preset("tiny-moe-test", moe_gmm_impl="ragged_dot", num_hidden_layers=2)
    ref_graphdef, state = nnx.split(random_model(cfg, seed=0))
    pallas_graphdef = nnx.split(ernie_jax.abstract_model(cfg.replace(moe_gmm_impl="pallas")))[0]
    graphdefs = {"ragged_dot": ref_graphdef, "pallas": pallas_graphdef}
    results = {}
    for impl, graphdef in graphdefs.items():
        def loss(st, x, graphdef=graphdef):
            logits = nnx.merge(graphdef, st)(x).logits
            lp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], -1)), logits

        traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(state, ids)
        assert ("pallas_call" in str(traced.jaxpr)) == (impl == "pallas")  # the kernel really runs
        (_, logits), grads = traced.lower().compile()(state, ids)
        results[impl] = logits, dict(nnx.to_flat_state(grads))
    (ref_logits, ref_grads), (logits, grads) = results["ragged_dot"], results["pallas"]
    _close(logits, ref_logits, 1e-5, "logits")
    assert grads.keys() == ref_grads.keys()
    expert_grads = 0
    for path, v in grads.items():
        _close(v.get_value(), ref_grads[path].get_value(), 1e-5, str(path))
        expert_grads += "experts" in str(path) and float(jnp.abs(v.get_value()).max()) > 0
    assert expert_grads == 3  # wi_gate, wi_up, wo got gradients through the kernel
