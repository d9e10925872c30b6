import jax.numpy as jnp
import numpy as np

from ernie_jax.model.dense import dense


def test_dense_matches_einsum():
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(2, 3, 4, 5).astype(np.float32))
    w1 = jnp.asarray(r.randn(5, 6, 7).astype(np.float32))
    np.testing.assert_allclose(dense(x, w1), jnp.einsum("ABCK,KNM->ABCNM", x, w1), rtol=1e-5, atol=1e-5)
    w2 = jnp.asarray(r.randn(4, 5, 6).astype(np.float32))
    np.testing.assert_allclose(dense(x, w2, n_in=2), jnp.einsum("ABCK,CKN->ABN", x, w2), rtol=1e-5, atol=1e-5)
    out = dense(x.astype(jnp.bfloat16), w1.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert out.shape == (2, 3, 4, 6, 7) and out.dtype == jnp.float32
