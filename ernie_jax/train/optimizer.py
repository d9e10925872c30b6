"""AdamW with global-norm clipping, the WSD schedule, no weight decay on norms / biases, and a separate
learning-rate multiplier for the routers (Baidu: AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.1, clip 1.0).

Parameters are a nested dict of arrays (`nnx.to_pure_dict` of the model's `nnx.Param` state); the paths
decide weight decay and the router multiplier.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from ernie_jax.model.balancing import is_router
from ernie_jax.train.schedule import wsd_schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    peak_lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    decay_fraction: float = 0.0  # WSD decay over this last fraction of the steps (0: constant after warmup)
    decay: str = "1-sqrt"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    router_lr_multiplier: float = 1.0
    # Regexes over parameter paths ("decoder/stacks/1/layers/mlp/vision_experts/wo"): when set, only matching
    # parameters train, the rest get zero updates and no optimizer state (staged VL recipe: the vision stage
    # trains ViT, adapter and vision experts with the LM frozen). Empty: everything trains.
    trainable: tuple[str, ...] = ()


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# norm scales and biases are not decayed (as Baidu's apply_decay_param_fun excludes bias and norm)
_NO_DECAY = {"scale", "bias", "bq", "bk", "bv", "bo", "bi_gate", "bi_up", "lm_head_bias",
             "bqkv", "b1", "b2", "proj_bias"}  # (the last four: ViT / adapter biases)


def trainable_mask(patterns: tuple[str, ...], params) -> object:
    """A tree of bools like params: True where the path matches one of the regexes (all True without any)."""
    import re  # noqa: PLC0415
    compiled = [re.compile(p) for p in patterns]
    for p, c in zip(patterns, compiled):
        if not any(c.search(_path_str(k)) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]):
            raise ValueError(f"OptimizerConfig.trainable: pattern {p!r} matches no parameter")
    return jax.tree_util.tree_map_with_path(
        lambda k, _: not compiled or any(c.search(_path_str(k)) for c in compiled), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if not 0 <= cfg.decay_fraction <= 1:
        raise ValueError(f"OptimizerConfig.decay_fraction must be in [0, 1], got {cfg.decay_fraction}")
    decay_steps = round(cfg.decay_fraction * total_steps)
    schedule = wsd_schedule(cfg.peak_lr, total_steps, warmup_steps=cfg.warmup_steps, decay_steps=decay_steps,
                            min_lr=cfg.min_lr, decay=cfg.decay)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: _path_str(p).rsplit("/", 1)[-1] not in _NO_DECAY, params)

    def router_scale(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: cfg.router_lr_multiplier if is_router(_path_str(p)) else 1.0, params)

    def scale_router_updates() -> optax.GradientTransformation:
        def update(updates, state, params=None):
            return jax.tree.map(lambda u, s: u * s, updates, router_scale(updates)), state
        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
        scale_router_updates(),
    )
    if cfg.trainable:
        labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",  # noqa: E731
                                             trainable_mask(cfg.trainable, params))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
