"""ernie_jax.train.restore: the abstract restore target is exactly the state `train()` builds (one builder,
`ernie_jax.train.step.abstract_train_state`): same tree, shapes, dtypes and shardings, nothing allocated."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import ernie_jax
from ernie_jax.sharding import MeshConfig, make_mesh, resolve_rules
from ernie_jax.train.ema import EMAConfig
from ernie_jax.train.loop import TrainConfig
from ernie_jax.train.optimizer import make_optimizer
from ernie_jax.train.restore import restore_target
from ernie_jax.train.step import init_train_state


def _layout(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef, [(jax.tree_util.keystr(p), a.shape, a.dtype, a.sharding) for p, a in leaves]


def test_the_restore_target_is_the_state_train_builds():
    cfg = TrainConfig(model=ernie_jax.get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=1),
                      mesh=MeshConfig(data=2, fsdp=-1), ema=EMAConfig(decay=0.9), total_steps=100)
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh)
    tx, _ = make_optimizer(cfg.optimizer, cfg.total_steps)
    state = init_train_state(ernie_jax.create_model(cfg.model, mesh=mesh, rules=rules), tx, ema=True)
    _, target = restore_target(cfg, mesh, rules)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(target))  # nothing allocated
    (t_def, t_leaves), (s_def, s_leaves) = _layout(target), _layout(state)
    assert t_def == s_def
    for (path, shape, dtype, sharding), (s_path, s_shape, s_dtype, s_sharding) in zip(t_leaves, s_leaves):
        assert (path, shape, dtype) == (s_path, s_shape, s_dtype)
        assert sharding.is_equivalent_to(s_sharding, len(shape)), (path, sharding, s_sharding)
    # the EMA is fp32 and sharded like its parameter; the counters are replicated
    params = {jax.tree_util.keystr(k): a for k, a in jax.tree_util.tree_flatten_with_path(target.params)[0]}
    ema = {jax.tree_util.keystr(k): a for k, a in jax.tree_util.tree_flatten_with_path(target.ema)[0]}
    key = next(k for k in params if "experts" in k)
    p, e = params[key], ema[key]
    assert e.dtype == jnp.float32 and e.shape == p.shape and e.sharding == p.sharding
    assert p.sharding.spec != P() and target.step.sharding == NamedSharding(mesh, P())


def test_no_ema_no_ema_leaves():
    cfg = TrainConfig(model=ernie_jax.get_preset("tiny-test"), mesh=MeshConfig(fsdp=-1), total_steps=100)
    _, target = restore_target(cfg, make_mesh(cfg.mesh), resolve_rules(cfg.mesh))
    assert target.ema is None and not cfg.ema.enabled
