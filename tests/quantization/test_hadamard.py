"""The randomised Hadamard rotation: R = H_D diag(s) / sqrt(D) against a Sylvester matrix built here by
Kronecker products, orthogonal; rotating queries and keys alike keeps q·k; it spreads an outlier channel;
head dimensions that are not powers of two are refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.quantization import hadamard


def _sylvester(d: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


@pytest.mark.parametrize("d", [1, 2, 16, 128])
def test_rotation_is_signed_sylvester_and_orthogonal(d):
    s = hadamard.random_signs(d, seed=3)
    assert set(np.unique(s)) <= {-1.0, 1.0}
    r = hadamard.rotation_matrix(d, seed=3)
    np.testing.assert_allclose(r, _sylvester(d) * s[None, :] / np.sqrt(d), atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-12)
    if d >= 16:  # the signs depend on the seed and are not all equal
        assert 0 < (s > 0).sum() < d
        assert not np.array_equal(s, hadamard.random_signs(d, seed=4))


def test_rotate_flips_signs_then_transforms():
    """rotate(x) = R x per vector = H (s * x) / sqrt(D): the signs act before the transform. (After it they would
    be useless: a symmetric per-token quantizer is blind to sign flips of its channels.) A vector along a
    Hadamard row, which the plain transform maps onto one channel, stays spread."""
    d = 32
    s, h = hadamard.random_signs(d, seed=2), _sylvester(d)
    x = np.random.RandomState(0).randn(4, d).astype(np.float32)
    want = (x * s) @ h.T / np.sqrt(d)
    np.testing.assert_allclose(hadamard.rotate(jnp.asarray(x), seed=2), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hadamard.unrotate(jnp.asarray(want.astype(np.float32)), seed=2), x, atol=1e-5)
    row = h[3:4].astype(np.float32)  # H row / sqrt(D) -> one channel without the signs
    assert np.abs(row @ h.T / np.sqrt(d)).max() == pytest.approx(np.sqrt(d))
    assert np.abs(np.asarray(hadamard.rotate(jnp.asarray(row), seed=2))).max() < np.sqrt(d) / 2


def test_scores_kept_and_outlier_channel_spread():
    d = 64
    rs = np.random.RandomState(0)
    q, k = rs.randn(3, 5, d).astype(np.float32), rs.randn(3, 7, d).astype(np.float32)
    k[..., 9] *= 40.0  # an outlier channel
    qr, kr = (np.asarray(hadamard.rotate(jnp.asarray(x), seed=1)) for x in (q, k))
    np.testing.assert_allclose(qr @ kr.swapaxes(-1, -2), q @ k.swapaxes(-1, -2), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(hadamard.unrotate(jnp.asarray(kr), seed=1), k, atol=1e-4)
    # per-token max over D relative to the vector's norm: the outlier channel dominates before, not after
    peak = lambda x: (np.abs(x).max(-1) / np.linalg.norm(x, axis=-1)).mean()  # noqa: E731
    assert peak(k) > 0.85 and peak(kr) < 0.3  # 1 / sqrt(D) = 0.125 is a perfectly flat vector


def test_bf16_rotation_keeps_the_norm():
    """The 1/sqrt(D) is applied in fp32: in bf16 the rotation is not scaled by a rounded constant."""
    x = jnp.asarray(np.random.RandomState(1).randn(256, 128), jnp.bfloat16)
    y = hadamard.rotate(x, seed=0, out_dtype=jnp.float32)
    ratio = np.linalg.norm(np.asarray(y), axis=-1) / np.linalg.norm(np.asarray(x, np.float32), axis=-1)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)


@pytest.mark.parametrize("d", [0, 12, 96, 3])
def test_head_dim_not_a_power_of_two_is_refused(d):
    with pytest.raises(ValueError, match=f"power of two, got head_dim={d}"):
        hadamard.rotation_matrix(d, seed=0)
