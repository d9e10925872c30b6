"""Dense oracle: the mask materialised from `startend_row_indices`, then plain-JAX fp32 attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flashmask.ops import canonical_bounds


def dense_mask(startend_row_indices, *, causal: bool, q_len: int) -> jax.Array:
    """bool [B, Hm, Sq, Sk], True = attend, straight from the Paddle semantics (ops.py docstring)."""
    sk = startend_row_indices.shape[2]
    b = canonical_bounds(startend_row_indices, causal=causal, big=max(q_len, sk))
    lts, lte, uts, ute = (b[:, :, t, None, :] for t in range(4))  # [B, Hm, 1, Sk]
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(sk)[None, :]
    masked_ll = (i >= lts) & (i < lte)
    masked_ur = jnp.ones_like(masked_ll) if causal else (i >= uts) & (i < ute)
    return jnp.where(i >= j, ~masked_ll, ~masked_ur)


def flashmask_attention_reference(q, k, v, startend_row_indices, *, causal: bool, scale: float | None = None):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]; rows with no visible key give zeros."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    allowed = dense_mask(startend_row_indices, causal=causal, q_len=sq)  # [B, Hm, Sq, Sk]
    allowed = jnp.broadcast_to(allowed, (b, hq) + allowed.shape[2:])
    kk = jnp.repeat(k, hq // hkv, axis=2)
    vv = jnp.repeat(v, hq // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, preferred_element_type=jnp.float32) * scale
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(allowed, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), vv, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
