"""Rotary position embedding of the ERNIE-4.5 LM: interleaved (GPT-J) pairs over the full head dim.

Pair j rotates `(x[2j], x[2j+1])` by angle `p * theta^(-2j/d)`. This is NOT the NeoX rotate-half layout
(which the ViT uses): transformers' ERNIE code repeat-interleaves cos/sin and rotates adjacent pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
    """[d/2] fp32, `theta^(-2j/d)` computed as transformers does (`1 / theta ** (arange(0, d, 2) / d)`)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """positions [B, S] (int) -> angles [B, S, d/2] fp32."""
    return positions.astype(jnp.float32)[..., None] * inv_frequencies(head_dim, theta)


def apply_interleaved_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, S, N, D], angles [B, S, D/2] -> x rotated, in fp32 and cast back to x's dtype."""
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
