"""Parameters that carry logical axis names (`nnx.Param(..., logical_axes=...)`).

We keep the names in our own metadata key instead of flax's `sharding` so that creating a model never
triggers flax's eager sharding (which needs a mesh); `ernie_jax.sharding` resolves the names to mesh
axes when a model is placed on a mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *, std: float,
                 dtype: jnp.dtype) -> nnx.Param:
    """N(0, std) init, as transformers' `_init_weights` does for ERNIE linear and embedding weights."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(names))


def const_param(value: float, shape: Sequence[int], names: Sequence[str | None], *, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, dtype), logical_axes=tuple(names))
