"""GPTQ (ernie_jax/quantization/gptq.py) against round-to-nearest and a plain float64 numpy GPTQ written here.

The output error ||x w - x w_hat||^2 / ||x w||^2 is computed in numpy float64 on held-out activations drawn
from the calibration distribution (correlated inputs plus a few large-outlier channels)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.quantization.gptq import (HessianAccumulator, gptq, gptq_codes, gptq_dequantized, hessian,
                                         prepare_hessian)
from pallas_kernels.qmm import format as qformat

K, N = 128, 32


def activations(t: int, seed: int) -> np.ndarray:
    """x [t, K] = z @ A (A a fixed random mixing) with 4 outlier channels 8x larger."""
    a = np.random.default_rng(1234).standard_normal((K, K)) / np.sqrt(K)
    x = np.random.default_rng(seed).standard_normal((t, K)) @ a
    x[:, :4] *= 8.0
    return x


@pytest.fixture(scope="module")
def problem():
    w = (np.random.default_rng(0).standard_normal((K, N)) * 0.02).astype(np.float32)
    return w, hessian(activations(1024, seed=1)), activations(1024, seed=2)


def output_error(x, w, w_hat) -> float:
    y = x @ np.asarray(w, np.float64)
    return float(np.sum((y - x @ np.asarray(w_hat, np.float64)) ** 2) / np.sum(y ** 2))


def rtn_numpy(w, bits: int, g: int) -> np.ndarray:
    """Asymmetric round-to-nearest per group of g rows, float64 (the grid of format.py's docstring)."""
    k, n = w.shape
    wg = np.asarray(w, np.float64).reshape(k // g, g, n)
    lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
    return (np.clip(np.round((wg - lo) / s), 0, 2 ** bits - 1) * s + lo).reshape(k, n)


def gptq_numpy(w, h, bits: int, g: int, percdamp: float = 0.01) -> np.ndarray:
    """Unblocked GPTQ in float64 (one row at a time, every later row updated at once): the oracle."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    out = np.zeros_like(w)
    for k in range(w.shape[0]):
        if k % g == 0:
            lo, hi = w[k:k + g].min(0), w[k:k + g].max(0)
            s = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
        out[k] = np.clip(np.round((w[k] - lo) / s), 0, 2 ** bits - 1) * s + lo
        w[k:] -= np.outer(u[k, k:], (w[k] - out[k]) / u[k, k])
    return out


@pytest.mark.parametrize("bits,symmetric,act_order", [
    (2, False, False), (2, True, False), (4, False, False), (8, True, False), (2, False, True), (4, True, True)])
def test_identity_hessian_gives_rtn_codes(problem, bits, symmetric, act_order):
    # H = I: no row's error reaches another row, so GPTQ rounds exactly as round-to-nearest does.
    w, _, _ = problem
    qt = gptq(w, np.eye(K), bits, 32, symmetric=symmetric, act_order=act_order, block_size=64)
    rtn = qformat.quantize(w, bits, 32, symmetric=symmetric)
    np.testing.assert_array_equal(qformat.unpack(qt.codes, bits, 32), qformat.unpack(rtn.codes, bits, 32))
    np.testing.assert_array_equal(qt.scales, rtn.scales)
    if not symmetric:
        np.testing.assert_array_equal(qt.zeros, rtn.zeros)


def test_identity_hessian_gives_rtn_at_3_bits(problem):
    w, _, _ = problem
    np.testing.assert_allclose(gptq_dequantized(w, np.eye(K), 3, 32), rtn_numpy(w, 3, 32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,bound", [(2, 0.6), (3, 0.5), (4, 0.5)])
def test_gptq_beats_rtn_on_held_out_activations(problem, bits, bound):
    w, h, x_test = problem
    rtn = output_error(x_test, w, rtn_numpy(w, bits, 32))
    ours = output_error(x_test, w, gptq_dequantized(w, h, bits, 32))
    assert ours < bound * rtn, (bits, ours, rtn)


def test_act_order_beats_rtn(problem):
    w, h, x_test = problem
    ours = output_error(x_test, w, gptq_dequantized(w, h, 2, 32, act_order=True))
    assert ours < 0.6 * output_error(x_test, w, rtn_numpy(w, 2, 32))


@pytest.mark.parametrize("group_size,block_size", [(32, 64), (128, 16)])
def test_blocked_matches_unblocked_numpy_gptq(problem, group_size, block_size):
    # lazy batch updates (groups inside a block, or a group spanning several blocks) change only rounding
    w, h, x_test = problem
    ours = np.asarray(gptq_dequantized(w, h, 2, group_size, block_size=block_size), np.float64)
    ref = gptq_numpy(w, h, 2, group_size)
    assert np.mean(np.isclose(ours, ref, rtol=0, atol=1e-5)) > 0.99
    assert output_error(x_test, w, ours) == pytest.approx(output_error(x_test, w, ref), rel=0.02)


@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_lie_on_their_grid(problem, symmetric):
    w, h, _ = problem
    qt = gptq(w, h, 2, 32, symmetric=symmetric)
    qformat.check_tensor(qt)
    w_hat = qformat.dequantize(qt)
    np.testing.assert_array_equal(w_hat, gptq_dequantized(w, h, 2, 32, symmetric=symmetric))
    # re-rounding the dequantized values on the stored grid gives back the same codes
    codes = qformat.codes_on_grid(w_hat.reshape(K // 32, 32, N), qt.scales, qt.zeros, 2).reshape(K, N)
    np.testing.assert_array_equal(codes, qformat.unpack(qt.codes, 2, 32))


def test_hessian_accumulates_batches_and_dead_inputs():
    x = activations(256, seed=3)
    x[:, 5] = 0.0  # a dead input channel
    acc = HessianAccumulator(K)
    for part in np.split(x, 4):
        acc.add(part.reshape(2, 32, K))
    np.testing.assert_allclose(acc.hessian(), x.T @ x / 256, rtol=1e-5, atol=1e-6)
    h, dead = prepare_hessian(acc.hessian(), percdamp=0.0)
    assert dead.tolist() == [k == 5 for k in range(K)] and h[5, 5] == 1.0
    # without damping only the dead-input handling keeps H invertible; the dead row is 0 rounded on its grid
    w = np.random.default_rng(4).standard_normal((K, N)).astype(np.float32)
    codes, scales, zeros = gptq_codes(w, acc.hessian(), 4, 32, percdamp=0.0)
    assert np.all(np.isfinite(scales)) and np.all(np.isfinite(zeros))
    dead_row = np.asarray(codes[5] * scales[0] + zeros[0])
    assert np.all(np.abs(dead_row) <= np.asarray(scales[0]) / 2 + 1e-6)


def test_bad_inputs_name_shape_and_rule(problem):
    w, h, _ = problem
    with pytest.raises(ValueError, match=r"\[K, N\] weight, got shape \(128,\)"):
        gptq_codes(w[:, 0], h, 4, 32)
    with pytest.raises(ValueError, match=r"\[128, 32\]: the Hessian must be \[K, K\] = \[128, 128\], got \(64, 64\)"):
        gptq_codes(w, h[:64, :64], 4, 32)
    with pytest.raises(ValueError, match=r"\[128, 32\]: group_size=48 must be positive and divide K=128"):
        gptq_dequantized(w, h, 4, 48)
    with pytest.raises(ValueError, match=r"\[128, 32\]: bits=1 must be in 2..8"):
        gptq_dequantized(w, h, 1, 32)
    with pytest.raises(ValueError, match=r"wq \[128, 32\]: bits=3 is not supported"):
        gptq(w, h, 3, 32, name="wq")
    with pytest.raises(ValueError, match=r"not positive definite; raise percdamp"):
        gptq_codes(w, -np.eye(K), 4, 32)
    with pytest.raises(ValueError, match=r"last dim must be K=128"):
        HessianAccumulator(K).add(jnp.ones((4, 64)))
    with pytest.raises(ValueError, match=r"no activations were added"):
        HessianAccumulator(K).hessian()
