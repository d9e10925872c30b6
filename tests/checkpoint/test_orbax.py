"""Orbax training checkpoints: a TrainState written on an 8-device mesh (data=2 x fsdp=4) restores onto a
4-device mesh (fsdp=4) with the target's shardings; a truncated or corrupt latest step is named in a
warning and the previous step is restored; with no loadable step, restore returns None."""

import logging
import os
import shutil
import time

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import ernie_jax
from ernie_jax.checkpoint.orbax import Checkpointer
from ernie_jax.sharding import MeshConfig, make_mesh, param_shardings, resolve_rules
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer
from ernie_jax.train.step import init_train_state
from random_weights import random_model

CFG = ernie_jax.get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=1)
LOGGER = "ernie_jax.checkpoint.orbax"


def _state(mesh, seed):
    """A train state sharded on `mesh` by the fsdp rules (host-drawn weights: no initialiser to compile)."""
    tx, _ = make_optimizer(OptimizerConfig(warmup_steps=2), 10)
    graphdef, state = nnx.split(random_model(CFG, seed=seed))
    state = jax.device_put(state, param_shardings(state, mesh, resolve_rules("fsdp")))
    return init_train_state(nnx.merge(graphdef, state), tx, ema=True)


def _bump(state, k):
    """A state distinguishable from `state` at step k (parameters shifted by k, the step set to k)."""
    return state.replace(step=jax.numpy.asarray(k, jax.numpy.int32),
                         params=jax.tree.map(lambda a: a + k, state.params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 written on the 8-device mesh; returns (directory, {step: host copy of the state})."""
    assert jax.device_count() == 8
    mesh8 = make_mesh(MeshConfig(data=2, fsdp=-1))
    base = _state(mesh8, seed=1)
    states = {k: _bump(base, k) for k in (1, 2)}
    directory = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = Checkpointer(directory, max_to_keep=3, async_save=True)
    for k, s in states.items():
        ckpt.save(k, s, {"batch": k})
    ckpt.close()
    return directory, {k: jax.device_get(s) for k, s in states.items()}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _restore(directory, target, *, with_data=True):
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.restore(target, with_data=with_data)
    finally:
        ckpt.close()


def _target4():
    mesh4 = make_mesh(MeshConfig(fsdp=-1), devices=jax.devices()[:4])
    return mesh4, _state(mesh4, seed=7)  # other values: the restore must overwrite them


def _assert_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_8_to_4_devices(saved):
    directory, host = saved
    mesh4, target = _target4()
    out = _restore(directory, target)
    assert out is not None
    step, state, data_state = out
    assert step == 2 and data_state == {"batch": 2} and int(state.step) == 2
    _assert_equal(state, host[2])
    n_sharded = 0
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert isinstance(got.sharding, NamedSharding)
        assert got.sharding.mesh.devices.size == 4 and set(got.sharding.device_set) == set(jax.devices()[:4])
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
        n_sharded += any(a is not None for a in got.sharding.spec)
    assert n_sharded > 10  # parameters, moments and EMA really are split over fsdp on the new mesh


def _truncate(step_dir):
    """Cuts every array data file of the step to half its length (an interrupted copy)."""
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            path = os.path.join(root, f)
            if os.sep + "d" + os.sep in path + os.sep and os.path.getsize(path) > 64:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                n += 1
    assert n > 0


def _scramble(step_dir):
    """Overwrites the state's metadata with garbage (a corrupt file)."""
    for name in ("_METADATA", "manifest.ocdbt"):
        with open(os.path.join(step_dir, "state", name), "wb") as fh:
            fh.write(os.urandom(256))


@pytest.fixture
def settle():
    """After a failed read, orbax's still-pending reads of the other arrays complete into an asyncio loop
    that is closed already ("Event loop is closed", harmless): let them land inside this (filtered) test
    rather than in whichever test runs next."""
    yield
    time.sleep(1.0)


IGNORE_CLOSED_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@IGNORE_CLOSED_LOOP
@pytest.mark.parametrize("damage", [_truncate, _scramble], ids=["truncated", "corrupt"])
def test_damaged_latest_falls_back_to_previous(saved, tmp_path, caplog, settle, damage):
    directory, host = saved
    d = _copy(directory, tmp_path / "ckpt")
    damage(os.path.join(d, "2"))
    mesh4, target = _target4()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _restore(d, target)
    assert out is not None
    step, state, data_state = out
    assert step == 1 and data_state == {"batch": 1}
    _assert_equal(state, host[1])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 2" in warnings[0] and d in warnings[0], warnings


@IGNORE_CLOSED_LOOP
def test_no_loadable_step_returns_none(saved, tmp_path, caplog, settle):
    directory, _ = saved
    d = _copy(directory, tmp_path / "ckpt")
    _truncate(os.path.join(d, "1"))
    _scramble(os.path.join(d, "2"))
    _, target = _target4()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert _restore(d, target) is None
    named = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("step 2" in m for m in named) and any("step 1" in m for m in named)
    assert _restore(str(tmp_path / "empty"), target, with_data=False) is None
