import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer


def test_no_decay_on_norms_and_biases_and_router_multiplier():
    params = {"attn": {"wq": jnp.ones((2, 2)), "bq": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)},
              "mlp": {"router": {"kernel": jnp.ones((2, 2))}}}
    cfg = OptimizerConfig(peak_lr=0.1, warmup_steps=0, weight_decay=0.5, router_lr_multiplier=3.0, clip_norm=1e9)
    tx, _ = make_optimizer(cfg, 10)
    zero = {k: {kk: jnp.zeros_like(vv) for kk, vv in v.items()} if k != "mlp" else
            {"router": {"kernel": jnp.zeros((2, 2))}} for k, v in params.items()}
    upd, _ = tx.update(zero, tx.init(params), params)
    # zero gradient: only weight decay moves a parameter (-lr * wd * p)
    np.testing.assert_allclose(np.asarray(upd["attn"]["wq"]), -0.1 * 0.5)
    assert np.all(np.asarray(upd["attn"]["bq"]) == 0) and np.all(np.asarray(upd["norm"]["scale"]) == 0)
    np.testing.assert_allclose(np.asarray(upd["mlp"]["router"]["kernel"]), -0.1 * 0.5 * 3.0)


def test_clipping_scales_the_gradient_to_the_global_norm():
    """b1 = b2 = 0 and a large eps make Adam's update linear in the gradient it sees: u = -lr * g / (|g| + eps).
    g of global norm 5 over two leaves is clipped to norm 1 (g / 5) before Adam; one of norm 0.5 is not."""
    params = {"a": jnp.zeros(2), "b": {"w": jnp.zeros(2)}}
    eps = 10.0
    tx, _ = make_optimizer(OptimizerConfig(peak_lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                                           b1=0.0, b2=0.0, eps=eps), 10)
    for g, scale in (({"a": jnp.asarray([3.0, 0.0]), "b": {"w": jnp.asarray([0.0, 4.0])}}, 1 / 5),
                     ({"a": jnp.asarray([0.3, 0.0]), "b": {"w": jnp.asarray([0.0, 0.4])}}, 1.0)):
        upd, _ = tx.update(g, tx.init(params), params)
        for u, gg in zip(jax.tree.leaves(upd), jax.tree.leaves(g)):
            seen = np.asarray(gg) * scale
            np.testing.assert_allclose(np.asarray(u), -seen / (np.abs(seen) + eps), rtol=1e-6)
