"""Exports the latest checkpoint of a training run as a transformers directory (config.json + safetensors).

    python -m experiments.export_hf --workdir=DIR --config=experiments/configs/tiny.py --out=OUT [--ema]
        [--dtype=bfloat16] [--config.mesh.fsdp=...]

`--config` must be the run's config file (with the same `--config.` overrides that change the model or the
loss, e.g. EMA on/off): it gives the model shape and the train-state layout to restore into. The checkpoint
restores onto this host's devices whatever mesh it was written on (override `--config.mesh.*` when the
config's mesh does not fit here); nothing is allocated before the restore (the target is abstract). The
newest loadable step is used; a truncated or corrupt newer one is named in a warning and skipped. `--ema`
writes the EMA weights (cast to the parameters' dtype) instead of the raw ones. Load the result with
`ernie_jax.from_pretrained(OUT)` or `transformers.AutoModelForCausalLM.from_pretrained(OUT)`.

Single process: the parameters are gathered to this host to be written.
"""

from __future__ import annotations

import logging as logging_std
import os

from absl import app, flags, logging

# --config (the run's config file, with --config.key=value overrides) and --workdir (required) are the
# launcher's own flags: one definition for both CLIs, so they can live in one process (tests).
from experiments.train import _CONFIG, _WORKDIR, _QuietLibraries, build

_OUT = flags.DEFINE_string("out", None, "output directory for config.json + safetensors", required=True)
_EMA = flags.DEFINE_bool("ema", False, "export the EMA of the parameters instead of the raw parameters")
_DTYPE = flags.DEFINE_string("dtype", None, "storage dtype of the written tensors (default: the parameters')")


def abstract_train_state(train_cfg, mesh, rules):
    """(abstract model, TrainState of ShapeDtypeStructs with the shardings `train()` gives it on `mesh`).

    Mirrors `ernie_jax.train.step.init_train_state` (fields, EMA in fp32, moments sharded like their
    parameters) without allocating anything."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ernie_jax.model import abstract_model
    from ernie_jax.sharding import param_shardings
    from ernie_jax.train.optimizer import make_optimizer
    from ernie_jax.train.step import TrainState, split_model, state_shardings

    model = abstract_model(train_cfg.model)
    _, p_state, b_state = split_model(model)
    p_shard = nnx.to_pure_dict(param_shardings(p_state, mesh, rules))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(p_state), p_shard)
    buffers = nnx.to_pure_dict(b_state)
    tx, _ = make_optimizer(train_cfg.optimizer, train_cfg.total_steps)
    ema = train_cfg.loss.ema > 0
    shapes = jax.eval_shape(lambda p, b: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, buffers=b, opt_state=tx.init(p),
        ema=jax.tree.map(lambda x: x.astype(jnp.float32), p) if ema else None,
        nonfinite_run=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32)), params, buffers)
    shardings = state_shardings(shapes, params, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return model, target


def model_from_state(model, state, *, ema: bool = False):
    """The module with the state's parameters (or its EMA, cast to the parameters' dtypes) and buffers."""
    import jax
    from flax import nnx

    from ernie_jax.train.step import merge_model, split_model

    graphdef, abs_params, abs_buffers = split_model(nnx.eval_shape(lambda: model))
    params = state.params
    if ema:
        if state.ema is None:
            raise app.UsageError("--ema: this run keeps no EMA (config.loss: no ema_decay / ema_window)")
        params = jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema, state.params)
    return merge_model(graphdef, abs_params, abs_buffers, params, state.buffers)


def export(config, workdir: str, out: str, *, ema: bool = False, dtype: str | None = None) -> int:
    """Restores the newest loadable checkpoint of `workdir`, writes `out`; returns the step exported."""
    import ernie_jax
    from ernie_jax.checkpoint.orbax import Checkpointer
    from ernie_jax.sharding import make_mesh, resolve_rules
    train_cfg, _, _ = build(config)
    mesh = make_mesh(train_cfg.mesh)
    model, target = abstract_train_state(train_cfg, mesh, resolve_rules(train_cfg.mesh))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise app.UsageError(f"no checkpoints in {directory}")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        restored = ckpt.restore(target, with_data=False)
    finally:
        ckpt.close()
    if restored is None:
        raise app.UsageError(f"no loadable checkpoint in {directory} (see the warnings above)")
    step, state, _ = restored
    ernie_jax.save_pretrained(model_from_state(model, state, ema=ema), out, dtype=dtype)
    return step


def main(argv):
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging_std.getLogger("ernie_jax").setLevel(logging_std.INFO)
    if jax.process_count() > 1:
        raise app.UsageError("export_hf runs in a single process")
    step = export(_CONFIG.value, _WORKDIR.value, _OUT.value, ema=_EMA.value, dtype=_DTYPE.value)
    print(f"exported step {step} of {_WORKDIR.value} ({'EMA' if _EMA.value else 'raw'} weights) to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
