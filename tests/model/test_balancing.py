import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import get_preset
from ernie_jax.model import abstract_model
from ernie_jax.model.balancing import bias_update, is_router, router_kernels, update_correction_biases
from random_weights import random_model


def _split(model):
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, params, buffers


def _zero_buffers(cfg):
    """The buffers (the routers' correction biases) as a new model has them: zeros, built without weights."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nnx.to_pure_dict(_split(abstract_model(cfg))[2]))


def test_bias_update_moves_toward_underused_experts():
    b = bias_update(jnp.zeros((2, 4)), jnp.asarray([[10, 2, 2, 2], [4, 4, 4, 4]]), 0.001)
    np.testing.assert_allclose(np.asarray(b), [[-0.001, 0.001, 0.001, 0.001], [0, 0, 0, 0]])


def test_update_maps_usage_rows_to_each_moe_stack_and_rebalances():
    """Layers 1 and 3 are MoE (two one-layer MoE stacks between dense ones): usage row 0 belongs to stack 1,
    row 1 to stack 3. A large step re-routes: every layer's most used expert loses load."""
    # ragged_dot: the quickest grouped matmul to compile on CPU (each backend has its own tests)
    cfg = get_preset("tiny-moe-test", num_hidden_layers=4, moe_layer_start_index=0, moe_layer_interval=2,
                     moe_gmm_impl="ragged_dot")
    model = random_model(cfg, seed=0, correction_biases=False)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 16)))
    usage = np.asarray(jax.jit(lambda t: model(t).moe_stats.usage)(ids))
    assert usage.shape == (2, 8) and not np.array_equal(usage[0], usage[1])
    np.testing.assert_allclose(usage.sum(-1), 4 * 16 * 2)  # every slot counted once
    graphdef, params, buffers = _split(model)
    new = update_correction_biases(nnx.to_pure_dict(buffers), jnp.asarray(usage), 0.5)
    for stack, row in ((1, 0), (3, 1)):
        want = 0.5 * np.sign(usage[row].mean() - usage[row])  # over-used experts go down, under-used up
        np.testing.assert_allclose(np.asarray(new["decoder"]["stacks"][stack]["layers"]["mlp"]["router"]["bias"]),
                                   want[None])
    nnx.replace_by_pure_dict(buffers, new)
    rebalanced = nnx.merge(graphdef, params, buffers)
    after = np.asarray(jax.jit(lambda t: rebalanced(t).moe_stats.usage)(ids))
    for layer in range(2):
        top = int(np.argmax(usage[layer]))
        assert after[layer, top] < usage[layer, top]


def test_vl_pools_get_their_own_usage():
    """A VL MoE layer has a text and a vision router; usage [L, 2, E] row pool 0 moves `router`, pool 1
    `vision_router` (swapped pools would show: the two usages differ)."""
    cfg = get_preset("tiny-vl-test")
    buffers = _zero_buffers(cfg)
    r = np.random.RandomState(1)
    usage = r.randint(0, 20, (2, 2, 8)).astype(np.float32)  # layers 1, 2 are MoE
    new = update_correction_biases(buffers, jnp.asarray(usage), 0.1)
    mlp = new["decoder"]["stacks"][1]["layers"]["mlp"]
    for pool, name in enumerate(("router", "vision_router")):
        want = 0.1 * np.sign(usage[:, pool].mean(-1, keepdims=True) - usage[:, pool])
        np.testing.assert_allclose(np.asarray(mlp[name]["bias"]), want)
    with pytest.raises(ValueError, match=r"need \(2, 2\)"):
        update_correction_biases(buffers, jnp.asarray(usage[:, 0]), 0.1)  # text-only usage for a VL model
    kernels = router_kernels(nnx.to_pure_dict(_split(abstract_model(cfg))[1]))
    assert [k.shape for k in kernels] == [(2, 32, 8), (2, 32, 8)]  # text and vision router of the MoE stack


def test_wrong_layer_count_is_refused():
    buffers = _zero_buffers(get_preset("tiny-moe-test"))  # layers 1, 2 are MoE
    with pytest.raises(ValueError, match=r"usage has shape \(3, 8\).*need \(2,\)"):
        update_correction_biases(buffers, jnp.zeros((3, 8)), 0.1)


def test_is_router():
    assert is_router("decoder/stacks/1/layers/mlp/router/kernel")
    assert is_router("decoder/stacks/1/layers/mlp/vision_router/kernel")
    assert not is_router("decoder/stacks/1/layers/mlp/experts/wo")
    assert not is_router("decoder/stacks/0/layers/self_attn/wq")
