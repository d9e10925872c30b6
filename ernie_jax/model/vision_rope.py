"""2D rotary position embedding of the ViT: axial (height, width) angles, NeoX rotate-half pairs.

Unlike the LM's interleaved RoPE (`ernie_jax.model.rope`), the ViT rotates the pairs `(x[i], x[i + D/2])`
(transformers' `rotate_half`). The first D/4 frequencies of a head carry the patch's row, the next D/4 its
column, each with `inv_freq[j] = theta^(-2j / (D/2))`, j < D/4 (`Ernie4_5_VLMoeVisionRotaryEmbedding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def vision_inv_frequencies(head_dim: int, theta: float) -> jax.Array:
    """[D/4] fp32: `1 / theta ** (arange(0, D/2, 2) / (D/2))`, as transformers computes it."""
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4 (a quarter of it per axis and "
                         f"rotate-half pairs)")
    half = head_dim // 2
    return 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))


def vision_rope_angles(coords: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """coords [..., 2] int (row h, column w of each patch) -> angles [..., D/2] fp32 `[h * f, w * f]`."""
    f = vision_inv_frequencies(head_dim, theta)
    c = coords.astype(jnp.float32)
    return jnp.concatenate([c[..., 0:1] * f, c[..., 1:2] * f], axis=-1)


def apply_rotate_half_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, P, N, D], angles [B, P, D/2] -> `x cos + rotate_half(x) sin` with the angles repeated over both
    halves; computed in fp32 and cast back to x's dtype (transformers' `apply_rotary_pos_emb_vision`)."""
    a = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, P, 1, D]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * jnp.cos(a) + rotated * jnp.sin(a)).astype(x.dtype)
