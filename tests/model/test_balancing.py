import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax import get_preset
from ernie_jax.model import create_model
from ernie_jax.model.balancing import apply_aux_free_update, bias_update


def test_bias_update_moves_toward_underused_experts():
    b = bias_update(jnp.zeros((2, 4)), jnp.asarray([[10, 2, 2, 2], [4, 4, 4, 4]]), 0.001)
    np.testing.assert_allclose(np.asarray(b), [[-0.001, 0.001, 0.001, 0.001], [0, 0, 0, 0]])


def test_apply_updates_each_moe_layer_and_changes_routing():
    cfg = get_preset("tiny-moe-test", num_hidden_layers=4, moe_layer_start_index=1)  # layers 1..3 are MoE
    model = create_model(cfg, seed=0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 16)))
    stats = model(ids).moe_stats
    assert stats.usage.shape == (3, 8)
    np.testing.assert_allclose(np.asarray(stats.usage.sum(-1)), 4 * 16 * 2)  # every slot counted once
    apply_aux_free_update(model, stats, coef=0.5)
    bias = np.asarray(model.decoder.stacks[1].layers.mlp.router.bias[...])
    np.testing.assert_allclose(bias, 0.5 * np.sign(np.asarray(stats.usage).mean(-1, keepdims=True)
                                                   - np.asarray(stats.usage)))
    after = model(ids).moe_stats.usage
    # a large step re-routes: the most used expert of every layer loses load
    for layer in range(3):
        top = int(np.argmax(np.asarray(stats.usage[layer])))
        assert float(after[layer, top]) < float(stats.usage[layer, top])
    with pytest.raises(ValueError, match="cover 2 MoE layers"):
        apply_aux_free_update(model, type(stats)(*(a[:2] for a in (stats.topk_count, stats.prob_sum,
                                                                  stats.num_tokens, stats.z_sum, stats.usage))),
                              0.1)
