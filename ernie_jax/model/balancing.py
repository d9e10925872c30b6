"""Aux-loss-free load balancing: after each optimizer step, move every router's correction bias toward
the under-used experts, `bias += coef * sign(mean(usage) - usage)` (Baidu's
`moe_correction_bias_adjust_callback`; `usage` = slots dispatched per expert in that step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model.moe import MoEStats


def bias_update(bias: jax.Array, usage: jax.Array, coef: float) -> jax.Array:
    """bias, usage [..., E] -> the updated bias (fp32)."""
    usage = usage.astype(jnp.float32)
    return bias + coef * jnp.sign(jnp.mean(usage, axis=-1, keepdims=True) - usage)


def apply_aux_free_update(model: nnx.Module, stats: MoEStats, coef: float) -> None:
    """Updates the routers of `model` in place from `stats` (the forward's `moe_stats`, one row per MoE
    layer in depth order; sum it over micro-batches / data shards first)."""
    biases = [s.layers.mlp.router.bias for s in model.decoder.stacks if s.kind == "moe"]
    total = sum(b.shape[0] for b in biases)
    if stats.usage.shape[0] != total:  # checked before anything is changed
        raise ValueError(f"stats cover {stats.usage.shape[0]} MoE layers, the model has {total}")
    start = 0
    for bias in biases:
        n = bias.shape[0]
        bias[...] = bias_update(bias[...], stats.usage[start:start + n], coef)
        start += n
