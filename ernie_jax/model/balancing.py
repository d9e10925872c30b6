"""The routers of a model's state trees, and aux-loss-free load balancing.

One owner for "where are the routers": the train step's orthogonality loss and bias update, the
optimizer's router learning-rate multiplier and the tests all find them here. A MoE layer has one router
per expert pool: `router` (text) and, in VL models, `vision_router` (vision), in that order.

Aux-loss-free balancing: after each optimizer step every router's correction bias moves toward its
under-used experts, `bias += coef * sign(mean(usage) - usage)` (Baidu's
`moe_correction_bias_adjust_callback`; `usage` = slots dispatched per expert in that step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

ROUTERS = ("router", "vision_router")  # pool order: the modality axis of a VL layer's MoEStats


def is_router(path: str) -> bool:
    """Whether a "/"-joined parameter path ("decoder/stacks/1/layers/mlp/router/kernel") is a router's."""
    return any(part in ROUTERS for part in path.split("/"))


def _moe_mlps(tree: Any) -> list[tuple[Any, dict]]:
    """(stack key, its `mlp` subtree) of every MoE stack of a params / buffers pure dict, in depth order."""
    stacks = tree["decoder"]["stacks"]
    return [(i, stacks[i]["layers"]["mlp"]) for i in sorted(stacks) if "router" in stacks[i]["layers"].get("mlp", {})]


def router_kernels(params: Any) -> list[jax.Array]:
    """Every router kernel [n, H, E] (one per MoE stack and pool) of a params pure dict, in depth order."""
    return [mlp[r]["kernel"] for _, mlp in _moe_mlps(params) for r in ROUTERS if r in mlp]


def bias_update(bias: jax.Array, usage: jax.Array, coef: float) -> jax.Array:
    """bias, usage [..., E] -> the updated bias (fp32)."""
    usage = usage.astype(jnp.float32)
    return bias + coef * jnp.sign(jnp.mean(usage, axis=-1, keepdims=True) - usage)


def update_correction_biases(buffers: Any, usage: jax.Array, coef: float) -> Any:
    """The buffers pure dict with every router's correction bias updated.

    usage: slots per expert of each MoE layer in depth order, [L_moe, E], or [L_moe, 2, E] for VL models
    (text pool, vision pool): the forward's `moe_stats.usage`, summed over micro-batches / data shards.
    """
    mlps = _moe_mlps(buffers)
    total = sum(mlp["router"]["bias"].shape[0] for _, mlp in mlps)
    pools = sum(r in mlps[0][1] for r in ROUTERS) if mlps else 0
    want = (total, pools) if pools > 1 else (total,)
    if usage.shape[:-1] != want:
        raise ValueError(f"usage has shape {usage.shape}; the model's MoE layers need {want} + (experts,)")
    stacks, start = dict(buffers["decoder"]["stacks"]), 0
    for i, mlp in mlps:
        n = mlp["router"]["bias"].shape[0]
        rows = usage[start:start + n]
        new = dict(mlp)
        for pool, r in enumerate(x for x in ROUTERS if x in mlp):
            new[r] = {**mlp[r], "bias": bias_update(mlp[r]["bias"], rows[:, pool] if pools > 1 else rows, coef)}
        stacks[i] = {**stacks[i], "layers": {**stacks[i]["layers"], "mlp": new}}
        start += n
    return {**buffers, "decoder": {**buffers["decoder"], "stacks": stacks}}
