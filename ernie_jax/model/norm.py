"""RMSNorm with transformers' Ernie4_5RMSNorm numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model.params import const_param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`scale * cast_in(x32 * rsqrt(mean(x32^2) + eps))`: normalised in fp32, cast back to x's dtype before
    the weight multiply (Llama style), so in bf16 the multiply happens in bf16 as in HF.  x: [..., H]."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = const_param(1.0, (dim,), ("norm",), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
