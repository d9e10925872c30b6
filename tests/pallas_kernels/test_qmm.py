"""Quantized matmul (pallas_kernels.qmm): the weight format against its definition, and the Pallas kernels
(interpret mode) against the plain-JAX oracles in `reference`.

The kernels compile once per static variant (bits, symmetry, activation mode), so each test
jits several variants together and the shapes are small; multi-tile grids come from explicit tiles.
Tolerances: fp32 activations 1e-5 relative to the output's scale (the oracle's math up to fp32 summation
order); bf16 activations 1e-2 (the kernel rounds the dequantized tile to bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qmm import choose_tiling, quantized_gmm, quantized_matmul, stack
from pallas_kernels.qmm import format as F
from pallas_kernels.qmm import ops
from pallas_kernels.qmm.format import QuantizedTensor
from pallas_kernels.qmm.ops import VMEM_BUDGET, quantize_activations, vmem_bytes
from pallas_kernels.qmm import reference as R
from pallas_kernels.qmm.reference import fake_quantize_activations


# jitted: eager jnp would compile each small op on its own (most of these tests' time)
quantize = jax.jit(F.quantize, static_argnums=(1, 2), static_argnames=("symmetric",))
quantize_stack = jax.jit(ops.quantize_stack, static_argnums=(1, 2), static_argnames=("symmetric",))
dequantize = jax.jit(F.dequantize)
pack = jax.jit(F.pack, static_argnums=(1, 2))
unpack = jax.jit(F.unpack, static_argnums=(1, 2))
qmm_reference = jax.jit(R.qmm_reference, static_argnames=("activation_bits", "out_dtype"))
qgmm_reference = jax.jit(R.qgmm_reference, static_argnames=("activation_bits", "out_dtype"))


def _close(actual, expected, tol, what=""):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what)


def _weights(rs, *shape):
    """Gaussian weights with per-column offsets (so asymmetric grids differ from symmetric ones)."""
    return (rs.randn(*shape) + rs.randn(*shape[:-2], 1, shape[-1])).astype(np.float32)


# --- the format (no kernels) -------------------------------------------------------------------------------


def _numpy_grid(w, bits, g, symmetric):
    """The grid's (scale, zero) per group [K / g, N] straight from the definition, in float64."""
    k, n = w.shape
    wg = w.astype(np.float64).reshape(k // g, g, n)
    if symmetric:
        s = np.abs(wg).max(axis=1) / (2 ** (bits - 1) - 1)
        return np.where(s > 0, s, 1.0), None
    lo, hi = wg.min(axis=1), wg.max(axis=1)
    s = (hi - lo) / (2 ** bits - 1)
    return np.where(s > 0, s, 1.0), lo


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_to_nearest_error_is_at_most_half_a_step(bits):
    """|w - dequantize(quantize(w))| <= scale / 2 elementwise, with the scale computed here from the definition,
    for symmetric / asymmetric and per-channel / grouped grids (a constant column included)."""
    rs = np.random.RandomState(bits)
    w = _weights(rs, 64, 12)
    w[:, 3] = 0.25  # constant column: exact on any grid
    for symmetric in (True, False):
        for g in (None, 16):
            qt = quantize(jnp.asarray(w), bits, g, symmetric=symmetric)
            gs = 64 if g is None else g
            s, z = _numpy_grid(w, bits, gs, symmetric)
            np.testing.assert_allclose(qt.scales, s, rtol=1e-6)
            if z is not None:
                np.testing.assert_allclose(qt.zeros, z, rtol=1e-6)
            step = np.repeat(s, gs, axis=0)  # [K, N]
            err = np.abs(np.asarray(dequantize(qt), np.float64) - w)
            assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7), (symmetric, g, (err / step).max())
            assert np.all(err[:, 3] <= 1e-7)
            u = np.asarray(unpack(qt.codes, bits, gs))
            assert u.min() >= 0 and u.max() < 2 ** bits and qt.codes.dtype == jnp.uint8


def test_pack_unpack_round_trip():
    rs = np.random.RandomState(0)
    for bits in (8, 4, 2):
        for g in (4, 8, 32):
            codes = rs.randint(0, 2 ** bits, (64, 5))
            packed = pack(jnp.asarray(codes), bits, g)
            assert packed.shape == (64 * bits // 8, 5) and packed.dtype == jnp.uint8
            np.testing.assert_array_equal(unpack(packed, bits, g), codes)


def test_packing_by_hand():
    """Planes inside each group: byte i of a group holds row r * g / P + i at bits [r * bits, (r + 1) * bits)."""
    # 4 bits, group 4 (P = 2, 2 bytes per group): byte 0 = row 0 | row 2 << 4, byte 1 = row 1 | row 3 << 4
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 8])[:, None]
    want = np.array([0x31, 0x42, 0x75, 0x86], np.uint8)[:, None]
    np.testing.assert_array_equal(pack(jnp.asarray(codes), 4, 4), want)
    # 2 bits, group 8 (P = 4, 2 bytes): byte i = row i | row 2+i << 2 | row 4+i << 4 | row 6+i << 6
    codes = np.array([0, 1, 2, 3, 3, 2, 1, 0])[:, None]
    want = np.array([0 | 2 << 2 | 3 << 4 | 1 << 6, 1 | 3 << 2 | 2 << 4 | 0 << 6], np.uint8)[:, None]  # 0x78, 0x2D
    np.testing.assert_array_equal(pack(jnp.asarray(codes), 2, 8), want)
    np.testing.assert_array_equal(unpack(jnp.asarray(want), 2, 8), codes)
    # 8 bits: the codes themselves
    np.testing.assert_array_equal(pack(jnp.asarray(codes * 60), 8, 4), codes * 60)


def test_activation_rounding_matches_the_oracle():
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(6, 40) * rs.rand(6, 1), jnp.float32).at[2].set(0.0)  # a zero row: scale 1
    q, s = quantize_activations(x)
    assert q.dtype == jnp.int8 and s.shape == (6, 1) and int(jnp.max(jnp.abs(q))) == 127
    np.testing.assert_array_equal(q.astype(jnp.float32) * s, fake_quantize_activations(x))
    assert float(s[2, 0]) == 1.0
    assert np.all(np.abs(np.asarray(fake_quantize_activations(x) - x)) <= np.asarray(s) / 2 + 1e-7)


def test_stacks():
    rs = np.random.RandomState(2)
    w = jnp.asarray(_weights(rs, 3, 32, 16))
    qts = quantize_stack(w, 4, 8, symmetric=False)
    assert qts.codes.shape == (3, 16, 16) and qts.scales.shape == qts.zeros.shape == (3, 4, 16)
    assert qts.shape == (32, 16) and qts.bits == 4 and qts.group_size == 8
    by_hand = stack([quantize(w[i], 4, 8, symmetric=False) for i in range(3)])
    for a, b in zip(jax.tree.leaves(qts), jax.tree.leaves(by_hand)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="weight 1"):
        stack([quantize(w[0], 4, 8), quantize(w[1], 4, 16)])


# --- tiling (no kernels) -------------------------------------------------------------------------------------


def test_choose_tiling_is_legal_and_fits_vmem():
    for m, k, n, bits, g, ab, groups in [
            (256, 2048, 1024, 4, 128, None, 1), (8, 8192, 8192, 4, 128, None, 1), (512, 8192, 8192, 8, 8192, 8, 1),
            (4096, 2560, 1536, 4, 128, None, 16), (4096, 2560, 1536, 8, 2560, 8, 16), (16, 2560, 1536, 2, 64, 8, 1),
            (1000, 1536, 2560, 4, 64, 8, 1), (7, 256, 96, 4, 32, None, 1)]:
        tm, tk, tn = choose_tiling(m, k, n, bits=bits, group_size=g, activation_bits=ab, num_groups=groups)
        assert tm == m or tm % 8 == 0, (m, tm)
        assert all(t == d or t % 128 == 0 for t, d in ((tk, k), (tn, n))), (k, n, tk, tn)
        assert k % tk == 0 and n % tn == 0 and (tk % g == 0 or (bits == 8 and g % tk == 0)), (tk, tn)
        assert vmem_bytes((tm, tk, tn), k=k, bits=bits, group_size=g, x_bytes=1 if ab else 2, out_bytes=2,
                          int8=ab == 8, asym=True) <= VMEM_BUDGET, (m, k, n, tm, tk, tn)
    assert choose_tiling(256, 2048, 1024, bits=4, group_size=128) == (256, 1024, 512)
    assert choose_tiling(64, 1024, 512, bits=4, group_size=128) == (64, 1024, 512)  # K fits: one K-tile
    assert choose_tiling(512, 8192, 8192, bits=8, group_size=8192, activation_bits=8) == (512, 1024, 512)
    assert choose_tiling(100, 320, 48, bits=4, group_size=64, interpret=True) == (100, 320, 48)  # one step


def test_bad_inputs_raise():
    rs = np.random.RandomState(3)
    qt = quantize(jnp.asarray(_weights(rs, 256, 256)), 4, 64)
    x = jnp.ones((16, 256), jnp.float32)
    with pytest.raises(ValueError, match=r"K=128 .*must equal the weight's shape\[0\] = 256"):
        quantized_matmul(jnp.ones((16, 128)), qt)
    with pytest.raises(ValueError, match="activation_bits=4 is not supported"):
        quantized_matmul(x, qt, activation_bits=4)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        quantized_matmul(x.astype(jnp.float16), qt)
    with pytest.raises(ValueError, match="tk=96 must divide K=256 and be a whole number of groups"):
        quantized_matmul(x, qt, tiles=(16, 96, 256), interpret=True)
    with pytest.raises(ValueError, match="tk=32 must divide K=256 and be a whole number of groups"):
        quantized_matmul(x, qt, tiles=(16, 32, 256), interpret=True)  # divides K, but half a group (4-bit)
    with pytest.raises(ValueError, match="tn=96 must divide N=256"):
        quantized_matmul(x, qt, tiles=(16, 128, 96), interpret=True)
    with pytest.raises(ValueError, match="tn=64 must be a multiple of 128"):
        quantized_matmul(x, qt, tiles=(16, 128, 64), interpret=False)
    with pytest.raises(ValueError, match="tn=64 must be a multiple of 128"):  # interpret=None: every target's
        quantized_matmul(x, qt, tiles=(16, 128, 64))
    with pytest.raises(ValueError, match="tm=12 must be a multiple of 8"):
        quantized_matmul(x, qt, tiles=(12, 128, 128), interpret=False)
    bad = QuantizedTensor(codes=qt.codes[:64], scales=qt.scales, zeros=None, bits=4, group_size=64, shape=(256, 256))
    with pytest.raises(ValueError, match=r"codes .* must be \(128, 256\)"):
        quantized_matmul(x, bad)
    qts = quantize_stack(jnp.asarray(_weights(rs, 2, 256, 128)), 4, 64)
    with pytest.raises(ValueError, match="rhs has 2 groups but group_sizes only 1"):
        quantized_gmm(x, qts, jnp.array([16], jnp.int32))
    with pytest.raises(ValueError, match="a stack's codes are"):
        quantized_gmm(x, qt, jnp.array([16], jnp.int32))
    with pytest.raises(ValueError, match=r"lhs \(16, 128\) has K=128"):
        quantized_gmm(jnp.ones((16, 128)), qts, jnp.array([8, 8], jnp.int32))


# --- kernels against the oracles -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_matmul_matches_oracle(bits):
    """Weight-only and int8 activations, symmetric and asymmetric, on a 3 x 2 x 2 grid (ragged last m-tile,
    two groups per K-tile, scales of the second K-tile read at an offset), fp32 x: 4 kernels in one jit."""
    rs = np.random.RandomState(10 + bits)
    m, k, n, g, tiles = 40, 256, 256, 64, (16, 128, 128)
    x = jnp.asarray(rs.randn(m, k), jnp.float32)
    w = jnp.asarray(_weights(rs, k, n))
    qts = [quantize(w, bits, g, symmetric=s) for s in (True, False)]
    variants = [(qt, ab) for qt in qts for ab in (None, 8)]

    @jax.jit
    def both(x, qts):
        return [quantized_matmul(x, qts[i // 2], activation_bits=ab, tiles=tiles, interpret=True)
                for i, (_, ab) in enumerate(variants)]

    got = both(x, qts)
    for (qt, ab), out in zip(variants, got):
        assert out.shape == (m, n) and out.dtype == jnp.float32
        _close(out, qmm_reference(x, qt, activation_bits=ab), 1e-5, f"symmetric={qt.symmetric} activation_bits={ab}")


def test_quantized_matmul_bf16_per_channel_and_subgroup_tiles():
    """bf16 x with default tiles (one grid step), per-channel weights; 8-bit per-channel codes tiled inside
    their one group (tk = K / 2: one scale row for both K-tiles); bf16 and fp32 outputs."""
    rs = np.random.RandomState(20)
    x = jnp.asarray(rs.randn(24, 256), jnp.bfloat16)
    w = jnp.asarray(_weights(rs, 256, 128))
    q4, q8 = quantize(w, 4, symmetric=False), quantize(w, 8)

    @jax.jit
    def run(x, q4, q8):
        return (quantized_matmul(x, q4, interpret=True),
                quantized_matmul(x, q8, activation_bits=8, tiles=(24, 128, 128), interpret=True,
                                 out_dtype=jnp.float32))

    wo, a8 = run(x, q4, q8)
    assert wo.dtype == jnp.bfloat16 and a8.dtype == jnp.float32
    _close(wo, qmm_reference(x, q4), 1e-2, "bf16 weight-only")
    _close(a8, qmm_reference(x, q8, activation_bits=8, out_dtype=jnp.float32), 1e-5, "W8A8 sub-group tiles")


def test_quantized_gmm_matches_oracle():
    """Empty groups (first, middle, last), uneven sizes, groups straddling m-tiles, a ragged last m-tile and
    trailing rows past sum(group_sizes) (zero); two K- and N-tiles; weight-only and int8 activations, 4-bit
    asymmetric and 2-bit symmetric stacks."""
    rs = np.random.RandomState(30)
    sizes = jnp.array([0, 5, 37, 0, 3, 22, 0], jnp.int32)  # 67 of 75 rows
    m, k, n, g = 75, 256, 256, 64
    x = jnp.asarray(rs.randn(m, k), jnp.float32)
    w = jnp.asarray(_weights(rs, 7, k, n))
    stacks = [quantize_stack(w, 4, g, symmetric=False), quantize_stack(w, 2, g, symmetric=True)]
    variants = [(0, None), (0, 8), (1, 8)]

    @jax.jit
    def run(x, stacks, sizes):
        return [quantized_gmm(x, stacks[i], sizes, activation_bits=ab, tiles=(16, 128, 128), interpret=True)
                for i, ab in variants]

    for (i, ab), out in zip(variants, run(x, stacks, sizes)):
        want = qgmm_reference(x, stacks[i], sizes, activation_bits=ab)
        _close(out, want, 1e-5, f"stack {i} activation_bits={ab}")
        np.testing.assert_array_equal(np.asarray(out)[67:], 0)


def test_quantized_gmm_group_offset_and_default_tiles():
    """A shard's 2 local groups of 4 (group_offset 1, traced): their rows match the oracle with the other
    groups' weights zeroed, every other row is zero. Defaults: interpret=None (the interpreter on CPU, chosen when
    lowering) and tiles (interpreter: about 2 steps per group)."""
    rs = np.random.RandomState(31)
    sizes = jnp.array([10, 20, 6, 12], jnp.int32)
    x = jnp.asarray(rs.randn(48, 128), jnp.bfloat16)
    full = quantize_stack(jnp.asarray(_weights(rs, 4, 128, 128)), 8, 32)
    local = jax.tree.map(lambda a: a[1:3], full)
    out = jax.jit(lambda o: quantized_gmm(x, local, sizes, group_offset=o, activation_bits=8,
                                          out_dtype=jnp.float32))(jnp.int32(1))
    zeroed = jax.tree.map(lambda a: a.at[0].set(0).at[3].set(0), full)  # scale 0: those groups' weights are 0
    want = qgmm_reference(x, zeroed, sizes, activation_bits=8, out_dtype=jnp.float32)
    _close(out, want, 1e-5)
    out = np.asarray(out)
    assert np.all(out[:10] == 0) and np.all(out[36:] == 0) and np.abs(out[10:36]).min() > 0
