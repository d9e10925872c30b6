"""`grouped_matmul`: lhs [M, K] (rows sorted by group) x rhs [G, K, N] per group, by the chosen
implementation. `ragged_dot` and `pallas` are library calls (`jax.lax.ragged_dot`, `pallas_kernels.gmm`);
`tiled` and `bucketed` have their own modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ernie_jax.config import GMM_IMPLS
from ernie_jax.model.grouped_matmul.bucketed import bucketed
from ernie_jax.model.grouped_matmul.tiled import default_tile, tiled


AUTO = {"tpu": "ragged_dot", "default": "bucketed"}  # `auto` per platform: the fastest measured on each


def on_platform(fn, *args):
    """fn(*args, impl=...) with `auto`'s choice for the platform being lowered for (`platform_dependent`, so
    an AOT compile for TPU from a CPU host gets `ragged_dot`; lowering keeps only that branch)."""
    return jax.lax.platform_dependent(*args, **{p: functools.partial(fn, impl=i) for p, i in AUTO.items()})


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tile: int = 0) -> jax.Array:
    """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] int -> [M, N] in lhs's dtype, fp32
    accumulation. Rows past sum(group_sizes) come out zero; sum(group_sizes) <= M is assumed.

    tile: rows per tile of `tiled`, and of `bucketed`'s skewed fallback (0 = from shapes).
    """
    if impl == "auto":
        return on_platform(functools.partial(grouped_matmul, tile=tile), lhs, rhs, group_sizes)
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    elif impl == "tiled":
        out = tiled(lhs, rhs, group_sizes, tile or default_tile(lhs.shape[0], rhs.shape[0]))
    elif impl == "bucketed":
        out = bucketed(lhs, rhs, group_sizes, tile=tile)
    elif impl == "pallas":
        from pallas_kernels.gmm import gmm  # noqa: PLC0415  (Pallas is imported only when asked for)
        out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; known: {GMM_IMPLS}")
    return out.astype(lhs.dtype)
