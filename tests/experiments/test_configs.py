"""Every experiment config file loads (`ernie_jax.experiment.load_experiment`, the embedded data) and its mesh
and sharding rules resolve on the 8 emulated CPU devices; the released-shape presets carry the published
recipe (training doc §8)."""

import glob
import importlib.util
import math
import os

import jax
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.model import abstract_model
from ernie_jax.sharding import make_mesh, param_specs, resolve_rules
from ernie_jax.experiment import load_experiment
from ernie_jax.train.optimizer import make_optimizer

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "experiments", "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
RELEASED = {"ernie45_0p3b.py": ("ernie-4.5-0.3b", 0.36e9), "ernie45_21b_a3b.py": ("ernie-4.5-21b-a3b", 21.8e9),
            "ernie45_300b_a47b.py": ("ernie-4.5-300b-a47b", 300.5e9)}


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_released_configs_exist():
    assert set(RELEASED) <= {os.path.basename(f) for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_config_builds_and_resolves_on_8_devices(path):
    c = _load(path)
    assert set(c.keys()) - {"dpo", "grpo"} == set(_load(os.path.join(CONFIG_DIR, "tiny.py")).keys())  # tiny's keys
    if c.data.get("kind") == "preference":
        c.init_from = "runs/sft/hf"  # DPO's reference model: given on the command line
    exp = load_experiment(c)
    train_cfg, data_cfg = exp.train, exp.data.train
    assert data_cfg.seq_len == c.data.seq_len and data_cfg.global_batch_size == c.data.global_batch_size
    assert exp.data.heldout is not None  # the embedded corpus has a held-out split
    assert train_cfg.ema.enabled == bool(c.ema.window or c.ema.decay)
    assert data_cfg.global_batch_size % train_cfg.micro_batches == 0
    make_optimizer(train_cfg.optimizer, train_cfg.total_steps)  # the WSD phases fit total_steps

    mesh = make_mesh(train_cfg.mesh)
    assert mesh.devices.size == jax.device_count() == 8
    rules = resolve_rules(train_cfg.mesh)
    state = nnx.state(abstract_model(train_cfg.model))
    shapes = dict(nnx.to_flat_state(state))
    specs = nnx.to_flat_state(param_specs(state, mesh, rules))
    sizes = dict(mesh.shape)
    for p, v in specs:  # every mesh axis a dimension is split over divides it (the rules are shape-aware)
        shape = shapes[p].get_value().shape
        for dim, axes in zip(shape, v.get_value()):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            assert dim % math.prod(sizes[a] for a in axes) == 0, (p, shape, v.get_value())

    name = os.path.basename(path)
    if name in RELEASED:
        preset, n_params = RELEASED[name]
        assert train_cfg.model == ernie_jax.get_preset(preset, **dict(c.model_overrides))
        assert ernie_jax.count_params(train_cfg.model) == pytest.approx(n_params, rel=0.02)
        o = train_cfg.optimizer
        assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.decay) == (0.9, 0.95, 1e-8, 0.1, 1.0, "1-sqrt")
        assert (o.peak_lr, o.min_lr, o.warmup_steps) == (2.2e-4, 2.2e-5, 200)
        assert train_cfg.model.param_dtype == "float32" and train_cfg.model.dtype == "bfloat16"
        assert data_cfg.seq_len == 4096
        if train_cfg.model.moe_num_experts:
            assert sizes["expert"] == 8 and train_cfg.model.moe_num_experts % sizes["expert"] == 0
            assert o.router_lr_multiplier == 0.01
            assert (train_cfg.loss.aux_coef, train_cfg.loss.aux_free_coef) == (1e-5, 1e-3)
            # the experts really are split over the expert axis
            experts = [v.get_value() for p, v in specs if "experts" in p]
            assert experts and all("expert" in tuple(s) for s in experts), experts


@pytest.mark.parametrize("stage", ["text", "vision", "joint"])
def test_tiny_vl_stages(stage):
    """The staged VL recipe: each stage builds; the vision stage's trainable patterns select exactly the ViT,
    adapter and vision experts / routers of the tiny-vl model; stages chain through their hf/ exports."""
    from experiments.configs import tiny_vl
    from ernie_jax.train.optimizer import trainable_mask
    from ernie_jax.train.step import split_model
    c = tiny_vl.get_config(stage)
    exp = load_experiment(c)
    train_cfg = exp.train
    assert exp.data.kind == exp.evaluation.kind == ("text" if stage == "text" else "vqa") and exp.export_hf
    assert train_cfg.init_from == {"text": "", "vision": "runs/tiny_vl_text/hf", "joint": "runs/tiny_vl_vision/hf"}[stage]
    _, params, _ = split_model(abstract_model(train_cfg.model))
    mask = trainable_mask(train_cfg.optimizer.trainable, nnx.to_pure_dict(params))
    on = {jax.tree_util.keystr(p) for p, t in jax.tree_util.tree_flatten_with_path(mask)[0] if t}
    if stage != "vision":
        assert not train_cfg.optimizer.trainable and len(on) == len(jax.tree.leaves(mask))
    else:
        assert on and all(("'vision'" in k or "'adapter'" in k or "'vision_experts'" in k or "'vision_router'" in k)
                          for k in on), sorted(on)
        assert any("'vision_router'" in k for k in on) and any("'patch_embed'" in k for k in on)
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask((r"^no_such_module/",), nnx.to_pure_dict(params))
    with pytest.raises(ValueError, match="stage"):
        tiny_vl.get_config("pretrain")
