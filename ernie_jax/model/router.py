"""The ERNIE-4.5 top-k router: fp32 softmax, selection-only correction bias, renormalised weights.

transformers `Ernie4_5_MoeTopKRouter` exactly: `probs = softmax(x32 @ W)`; the experts are the top-k of
`probs + bias` (the bias only changes *which* experts are chosen: aux-loss-free balancing), their weights
are the unbiased `probs`, divided by `max(sum, moe_norm_min)` and cast to the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.model.params import normal_param


class RouterBias(nnx.Variable):
    """The correction bias `e_score_correction_bias` [E]: fp32, moved by the aux-free balancing update, not by
    gradients (an optimizer over `nnx.Param` never touches it)."""


@struct.dataclass
class Routing:
    logits: jax.Array  # [T, E] fp32 raw router logits
    probs: jax.Array  # [T, E] fp32 softmax
    expert_ids: jax.Array  # [T, k] int32, chosen on probs + bias
    weights: jax.Array  # [T, k] activation dtype, renormalised unbiased probs


class Router(nnx.Module):
    """kernel [H, E] fp32 (logical `embed`, replicated over experts), bias [E] fp32."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, norm_min: float, std: float, rngs: nnx.Rngs):
        self.top_k, self.norm_min = top_k, norm_min
        self.kernel = normal_param(rngs, (hidden, num_experts), ("embed", None), std=std, dtype=jnp.float32)
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> Routing:
        """x [T, H] -> Routing."""
        logits = jnp.einsum("TH,HE->TE", x.astype(jnp.float32), self.kernel[...],
                            precision=jax.lax.Precision.HIGHEST)
        probs = jax.nn.softmax(logits, axis=-1)
        _, ids = jax.lax.top_k(probs + jax.lax.stop_gradient(self.bias[...]), self.top_k)
        w = jnp.take_along_axis(probs, ids, axis=-1)
        w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), self.norm_min)
        return Routing(logits=logits, probs=probs, expert_ids=ids.astype(jnp.int32), weights=w.astype(x.dtype))
