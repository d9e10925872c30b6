import numpy as np
import jax.numpy as jnp

from ernie_jax.model.norm import rms_norm


def test_rms_norm_matches_reference_fp32():
    rng = np.random.RandomState(0)
    x, w = rng.randn(3, 5, 32).astype(np.float32), rng.randn(32).astype(np.float32)
    ref = w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)), ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_casts_before_weight():
    """HF: normalise in fp32, cast to the input dtype, then multiply by the weight in that dtype."""
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(4, 64), jnp.bfloat16)
    w = jnp.asarray(rng.randn(64) * 3, jnp.bfloat16)
    y = rms_norm(x, w, 1e-5)
    x32 = np.asarray(x, np.float32)
    normed = jnp.asarray(x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-5), jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(w * normed))
