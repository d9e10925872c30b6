import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.losses import moe_aux_loss, mtp_loss, router_orthogonal_loss, router_z_loss
from ernie_jax.model.moe import router_stats
from ernie_jax.model.router import Routing


def _stats(logits, k, mask=None, bias=None):
    """MoEStats of one layer from raw router logits, through the model's own code path."""
    probs = jax.nn.softmax(logits, -1)
    sel = probs if bias is None else probs + bias
    _, ids = jax.lax.top_k(sel, k)
    r = Routing(logits=logits, probs=probs, expert_ids=ids, weights=jnp.take_along_axis(probs, ids, -1))
    return router_stats(r, mask)


def _stack(stats):
    return jax.tree.map(lambda *a: jnp.stack(a), *stats)


@pytest.mark.hf
@pytest.mark.parametrize("with_mask", [False, True])
def test_aux_loss_equals_transformers(with_mask):
    torch = pytest.importorskip("torch")
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import load_balancing_loss_func

    rng = np.random.RandomState(0)
    b, s, e, k = 2, 7, 8, 2
    layers = [rng.randn(b * s, e).astype(np.float32) * 2 for _ in range(3)]
    am = np.ones((b, s), np.int64)
    am[0, 5:] = 0
    mask = jnp.asarray(am.reshape(-1).astype(bool)) if with_mask else None
    # the correction bias changes the dispatched experts but not the aux loss (as in transformers)
    bias = jnp.asarray(rng.randn(e).astype(np.float32))
    ours = moe_aux_loss(_stack([_stats(jnp.asarray(z), k, mask, bias) for z in layers]))
    ref = load_balancing_loss_func(tuple(torch.tensor(z) for z in layers), e, k,
                                   torch.tensor(am) if with_mask else None)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)


def test_aux_loss_is_k_when_perfectly_balanced():
    e, k = 4, 2
    logits = jnp.zeros((8, e)) + jnp.asarray(np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 1e-3)
    assert abs(float(moe_aux_loss(_stack([_stats(logits, k)]))) - k) < 1e-2


def test_z_loss():
    rng = np.random.RandomState(1)
    z = rng.randn(2, 5, 4).astype(np.float32)
    m = np.array([1, 1, 1, 0, 1], bool)
    st = _stack([_stats(jnp.asarray(z[0]), 2, jnp.asarray(m)), _stats(jnp.asarray(z[1]), 2)])
    lse = np.log(np.exp(z).sum(-1))
    ref = (lse[0][m] ** 2).mean() + (lse[1] ** 2).mean()
    np.testing.assert_allclose(float(router_z_loss(st)), ref, rtol=1e-5)


def test_orthogonal_loss():
    rng = np.random.RandomState(2)
    w = rng.randn(3, 16, 4).astype(np.float32)  # [L, H, E]
    ref = 0.0
    for layer in w:
        rows = layer.T / np.linalg.norm(layer.T, axis=1, keepdims=True)
        ref += ((rows @ rows.T - np.eye(4)) ** 2).sum() / 16
    np.testing.assert_allclose(float(router_orthogonal_loss(jnp.asarray(w))), ref, rtol=1e-5)
    # orthonormal expert directions -> zero; the gradient pushes toward orthogonality
    q = np.linalg.qr(rng.randn(16, 4))[0].astype(np.float32)
    assert float(router_orthogonal_loss(jnp.asarray(q * 3.0))) < 1e-10
    g = jax.grad(router_orthogonal_loss)(jnp.asarray(w[0]))
    assert float(router_orthogonal_loss(jnp.asarray(w[0]) - 0.1 * g)) < float(router_orthogonal_loss(jnp.asarray(w[0])))


def test_mtp_loss_masks_and_averages_depths():
    rng = np.random.RandomState(3)
    logits = rng.randn(2, 1, 3, 5).astype(np.float32)
    targets = rng.randint(0, 5, (2, 1, 3))
    mask = np.array([[[1, 1, 0]], [[1, 0, 0]]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ref = ((nll[0] * mask[0]).sum() / 2 + (nll[1] * mask[1]).sum() / 1) / 2
    np.testing.assert_allclose(float(mtp_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))), ref,
                               rtol=1e-5)
