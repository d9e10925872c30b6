"""MTP speculative decoding: the model's first MTP depth drafts the token after next, the main model verifies.

One step for a row holding n positions in its cache, its last token t (position n, not yet in the cache) and a
draft d for position n + 1 drawn from the MTP distribution q:
1. the main model runs on [t, d] at positions n, n + 1 (one forward over 2 tokens): p0 (its distribution for
   position n + 1) and p1 (for n + 2);
2. d is accepted with probability min(1, p0(d) / q(d)); if rejected, position n + 1 takes a token from
   norm(max(p0 - q, 0)) instead (the standard speculative-sampling rule: the emitted tokens are distributed
   exactly as the main model's own sampling); if accepted, a bonus token is drawn from p1;
3. the MTP depth runs on the positions the step settled (n, and n + 1 when accepted; one pass over 2
   positions) and drafts the next d. Entries written past a rejection are stale: the row's index moves only
   past the accepted tokens, and the next step overwrites them (the cache "rolls back" for free).
Greedy rows use one-hot distributions, which turns the rule into "accept iff d is the main model's argmax":
greedy speculative output equals plain greedy output token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.inference.sampling import sample_from


def accept_draft(p: jax.Array, q: jax.Array, draft: jax.Array, key_accept: jax.Array,
                 key_replace: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p, q [B, V] (target and draft distributions), draft [B] (drawn from q), keys [B] ->
    (accepted [B] bool, the token for the draft's position [B] int32: the draft or its replacement)."""
    pd = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    u = jax.vmap(jax.random.uniform)(key_accept)
    accepted = u * qd < pd  # u < p(d) / q(d), without dividing by a zero q(d)
    residual = jnp.maximum(p - q, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)  # p == q: never rejected
    token = jnp.where(accepted, draft, sample_from(residual, key_replace))
    return accepted, token.astype(jnp.int32)
