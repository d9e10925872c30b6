"""TPU ahead-of-time compile of the real train step (`make_train_step`: gradient accumulation, the losses,
clipped AdamW, the correction-bias update, the EMA; the state donated) on a CPU-only host, for a MoE model
on the `ragged_dot` grouped-matmul path and for the VL model (ViT, adapter, two expert pools, 3D RoPE).

The state is the abstract `TrainState` the loop restores into (shapes and shardings on a `v5p:2x2x1`
topology mesh); nothing is allocated.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see test_model_aot.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import ernie_jax  # noqa: E402
from ernie_jax.sharding import MeshConfig, activate, make_mesh, resolve_rules  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402
from ernie_jax.train.ema import EMAConfig  # noqa: E402
from ernie_jax.train.loop import TrainConfig  # noqa: E402
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from ernie_jax.train.restore import restore_target  # noqa: E402
from ernie_jax.train.step import LossConfig, make_train_step  # noqa: E402

_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

ROWS = ("data", "fsdp", "expert")  # the batch follows the `act_batch` rule
A, B, S = 2, 8, 64  # micro-batches, rows (2 per chip), tokens per row


def _batch(cfg, mesh) -> dict:
    """Abstract [A, B, ...] batch with the loop's shardings; VL adds one 8x8-patch image per row."""
    rows = NamedSharding(mesh, P(None, ROWS, None))
    spec = lambda shape, dtype, sh=rows: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    batch = {k: spec((A, B, S), jnp.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids")}
    if cfg.vision is None:
        batch["positions"] = spec((A, B, S), jnp.int32)
    else:
        v = cfg.vision
        patch_dim = v.in_channels * v.patch_size ** 2  # one image of 8 x 8 patches per row
        batch.update(mm_token_type_ids=spec((A, B, S), jnp.int32), moe_mm_token_type_ids=spec((A, B, S), jnp.int32),
                     pixel_values=spec((A, B, 64, patch_dim), jnp.float32, NamedSharding(mesh, P(None, ROWS, None, None))),
                     image_grid_thw=spec((A, B, 1, 3), jnp.int32, NamedSharding(mesh, P(None, ROWS, None, None))))
    return batch


def compile_train_step(cfg: ernie_jax.ErnieConfig):
    devices = virtual_tpu_devices("v5p:2x2x1")
    mesh_cfg = MeshConfig(fsdp=-1)
    mesh, rules = make_mesh(mesh_cfg, devices=devices), resolve_rules(mesh_cfg)
    train_cfg = TrainConfig(model=cfg, mesh=mesh_cfg, optimizer=OptimizerConfig(), total_steps=100,
                            loss=LossConfig(aux_coef=1e-3, z_coef=1e-4, orth_coef=1e-3, aux_free_coef=1e-3,
                                            mtp_coef=0.0), ema=EMAConfig(decay=0.999))
    model, state = restore_target(train_cfg, mesh, rules)
    tx, schedule = make_optimizer(train_cfg.optimizer, train_cfg.total_steps)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    with activate(mesh, rules), jax.default_matmul_precision(None):  # training precision (see test_model_aot)
        step = jax.jit(make_train_step(model, tx, schedule, train_cfg.loss, ema_cfg=train_cfg.ema), donate_argnums=0,
                       out_shardings=(shardings, None))
        lowered = step.lower(state, _batch(cfg, mesh))
    return state, lowered, lowered.compile()


def _check_step_program(state, compiled):
    hlo = compiled.as_text()
    assert ":T(8,128)" in hlo, "no TPU tiled layouts in the compiled program"
    assert {d.platform for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set} == {"tpu"}
    mem = compiled.memory_analysis()
    state_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
    # the donated state is aliased to the new state: (nearly) all of its bytes (scalars may be re-laid out)
    assert mem.alias_size_in_bytes >= 0.9 * state_bytes, (mem.alias_size_in_bytes, state_bytes)
    assert "all-gather" in hlo and ("reduce-scatter" in hlo or "all-reduce" in hlo)  # FSDP
    return hlo


def test_moe_train_step_on_ragged_dot():
    """`moe_gmm_impl="auto"` picks `ragged_dot` when lowering for TPU, even from a CPU host."""
    cfg = ernie_jax.get_preset("tiny-moe-test", hidden_size=128, head_dim=32, moe_intermediate_size=(128,))
    state, lowered, compiled = compile_train_step(cfg)
    assert "ragged_dot" in lowered.as_text()  # the grouped matmul reaches the TPU compiler as ragged_dot
    _check_step_program(state, compiled)


def test_vl_train_step():
    state, lowered, compiled = compile_train_step(ernie_jax.get_preset("tiny-vl-test"))
    assert "ragged_dot" in lowered.as_text()
    # both expert pools, the ViT and the adapter are trained: each has optimizer moments in the state
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    for part in ("'vision'", "'adapter'", "'vision_experts'", "'vision_router'", "'experts'"):
        assert any(part in p for p in paths), part
    _check_step_program(state, compiled)
