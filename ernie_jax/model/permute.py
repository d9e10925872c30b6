"""Row permutations for MoE dispatch whose gradients are gathers too (no scatter-add).

Sorting token-slots by expert and undoing it are permutations; a plain `x[order]` would transpose to a
scatter-add in the backward pass. Here the cotangent of a gather by `order` is a gather by its inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, valid: jax.Array, inv_idx: jax.Array,
                inv_valid: jax.Array) -> jax.Array:
    """out[p] = x[idx[p]] where valid[p] else 0, for a partial bijection p <-> idx[p]; (inv_idx, inv_valid)
    is its inverse on x's rows. The cotangent is the gather g[inv_idx] (zero where not inv_valid)."""
    return jnp.where(valid[:, None], x[idx], 0)


def _gather_fwd(x, idx, valid, inv_idx, inv_valid):
    return gather_rows(x, idx, valid, inv_idx, inv_valid), (idx, valid, inv_idx, inv_valid)


def _gather_bwd(res, g):
    idx, valid, inv_idx, inv_valid = res
    return jnp.where(inv_valid[:, None], g[inv_idx], 0), None, None, None, None


gather_rows.defvjp(_gather_fwd, _gather_bwd)


def sort_permutation(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, inverse): the stable sort of `keys` and its inverse permutation."""
    order = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, inverse


def permute_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[order] for a full permutation (inverse = its inverse); the cotangent is g[inverse]."""
    true = jnp.ones(order.shape, bool)
    return gather_rows(x, order, true, inverse, true)
