"""A training run's model back from its Orbax checkpoints (raw weights or their EMA), for the CLIs that read
runs: `experiments.export_hf`, `experiments.generate`, the decode benchmark.

The restore target is abstract (shapes and the shardings `train()` gives the state on the config's mesh):
nothing is allocated before the restore, and a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from ernie_jax.checkpoint.orbax import Checkpointer
from ernie_jax.model import abstract_model
from ernie_jax.sharding import make_mesh, param_shardings, resolve_rules
from ernie_jax.train.optimizer import make_optimizer
from ernie_jax.train.step import abstract_train_state, merge_model, split_model


class RestoreError(ValueError):
    """A run that cannot be restored: no checkpoint, none that fits the config, no EMA asked for."""


def restore_target(train_cfg, mesh, rules):
    """(abstract model, the TrainState `train()` builds for `train_cfg` on `mesh`, as ShapeDtypeStructs with
    their shardings: `ernie_jax.train.step.abstract_train_state` of the sharded abstract parameters)."""
    model = abstract_model(train_cfg.model)
    _, p_state, b_state = split_model(model)
    p_shard = nnx.to_pure_dict(param_shardings(p_state, mesh, rules))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(p_state), p_shard)
    tx, _ = make_optimizer(train_cfg.optimizer, train_cfg.total_steps)
    return model, abstract_train_state(params, nnx.to_pure_dict(b_state), tx, ema=train_cfg.ema.enabled)


def model_from_state(model, state, *, ema: bool = False):
    """The module with the state's parameters (or its EMA, cast to the parameters' dtypes) and buffers."""
    graphdef, abs_params, abs_buffers = split_model(nnx.eval_shape(lambda: model))
    params = state.params
    if ema:
        if state.ema is None:
            raise RestoreError("this run keeps no EMA (config.ema: no decay / window)")
        params = jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema, state.params)
    return merge_model(graphdef, abs_params, abs_buffers, params, state.buffers)


def restore_model(train_cfg, workdir: str, *, ema: bool = False):
    """(model, step) of the newest loadable checkpoint under `workdir`/checkpoints, on `train_cfg`'s mesh."""
    if ema and not train_cfg.ema.enabled:
        raise RestoreError("this run keeps no EMA (config.ema: no decay / window)")
    mesh = make_mesh(train_cfg.mesh)
    model, target = restore_target(train_cfg, mesh, resolve_rules(train_cfg.mesh))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise RestoreError(f"no checkpoints in {directory}")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        restored = ckpt.restore(target, with_data=False)
    finally:
        ckpt.close()
    if restored is None:
        raise RestoreError(f"no checkpoint in {directory} restores into the train state of this config (see the "
                           "warnings above): is it the run's config, with its overrides?")
    step, state, _ = restored
    return model_from_state(model, state, ema=ema), step
