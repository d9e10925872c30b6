"""Losses of ERNIE-4.5 pre-training that live outside the model: token-balanced LM loss, router losses, MTP.

`token_balanced_loss` (training doc §2): the gradient flows through `sum(mask * ce) / slots`, where `slots`
is the number of token slots in the micro-batch (a constant, B * S), while the value reported is the usual
per-token mean `sum(mask * ce) / sum(mask)`. Every supervised token then weighs the same in the gradient,
however many unsupervised tokens share its sequence.

Router losses read the per-layer `MoEStats` the forward returns (leading axis = MoE layers):
- `moe_aux_loss`: transformers' `load_balancing_loss_func` exactly (counts from plain top-k of the probs,
  no correction bias; sums accumulated over layers, then `E * sum_e f_e * P_e`);
- `router_z_loss`: per layer the mean over real tokens of logsumexp(logits)^2, summed over layers;
- `router_orthogonal_loss`: per router, rows of W (one per expert) L2-normalised,
  `||W W^T - I||_F^2 / E^2`, summed over layers.
The token-balanced LM loss and the way these are combined belong to the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.model.moe import MoEStats


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] (any float dtype), targets [...] int -> per-token cross-entropy [...] in fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def token_balanced_loss(ce: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ce, mask [B, S] -> (loss to differentiate, per-token mean to report).

    The first has the gradient of `sum(mask * ce) / (B * S)` and the value of the per-token mean, as
    Baidu's criterion returns `L_tb - stopgrad(L_tb) + stopgrad(L_mean)`.
    """
    m = mask.astype(jnp.float32)
    total = jnp.sum(ce * m)
    mean = total / jnp.maximum(jnp.sum(m), 1.0)
    balanced = total / m.size
    return balanced - jax.lax.stop_gradient(balanced) + jax.lax.stop_gradient(mean), mean


def moe_aux_loss(stats: MoEStats) -> jax.Array:
    """Load-balancing loss as transformers computes it; ~k when routing is balanced. Stats [L, E] (one
    router per layer), or [L, M, E] for VL (text / vision pools): one loss per pool, summed (Paddle's
    per-modality aux loss; transformers' VL code mixes both pools' logits in one)."""
    n = jnp.maximum(jnp.sum(stats.num_tokens, axis=0), 1.0)[..., None]
    f = jnp.sum(stats.topk_count, axis=0) / n
    p = jnp.sum(stats.prob_sum, axis=0) / n
    return stats.topk_count.shape[-1] * jnp.sum(f * p)


def router_z_loss(stats: MoEStats) -> jax.Array:
    """Sum over MoE layers (and VL pools) of mean_t logsumexp(router logits)^2."""
    return jnp.sum(stats.z_sum / jnp.maximum(stats.num_tokens, 1.0))


def router_orthogonal_loss(kernel: jax.Array, eps: float = 1e-12) -> jax.Array:
    """kernel [..., H, E] (our router layout; leading axes = layers, summed) -> scalar."""
    w = jnp.swapaxes(kernel, -1, -2).astype(jnp.float32)  # [..., E, H], a row per expert
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)
    e = w.shape[-2]
    gram = jnp.einsum("...EH,...FH->...EF", w, w, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.square(gram - jnp.eye(e)) / e**2)


def mtp_loss(mtp_logits: jax.Array, mtp_targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over depths of the masked mean token cross-entropy.

    mtp_logits [D, B, S, V], mtp_targets [D, B, S] (the main targets shifted left by d), mask [D, B, S].
    The trainer adds it with weight `lambda_mtp` (0.3 in Baidu's code).
    """
    logp = jax.nn.log_softmax(mtp_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, mtp_targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    per_depth = jnp.sum(nll * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
    return jnp.mean(per_depth)
