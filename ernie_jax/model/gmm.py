"""Grouped matmul: `out[rows of group g] = lhs[rows of group g] @ rhs[g]`, rows sorted by group.

Implementations, chosen by `ErnieConfig.moe_gmm_impl`:
- `ragged_dot`: `jax.lax.ragged_dot`, the fast path on GPU/TPU. On CPU XLA lowers it to a dense
  computation over every group, so its cost grows with the number of experts.
- `tiled`: plain JAX for CPU. Each group is padded to whole tiles of `tile` rows cut from the sorted order,
  so every tile belongs to one group; one batched matmul then runs over all tiles with each tile's
  expert weights. Work is (M + G * tile) rows, about 2M with the default tile ~ M / G: flat in G.
- `pallas`: the Pallas kernel of `pallas_kernels.gmm` (its own issue).
`auto` picks `ragged_dot` on TPU and `tiled` elsewhere: on an H200 (jax 0.11, bf16, 21B-A3B expert
shapes) `tiled` measured 5x faster than `ragged_dot` forward and 8x forward+backward (docs/benchmarks.md). Rows past sum(group_sizes) come out zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ernie_jax.config import GMM_IMPLS


def default_tile(m: int, g: int) -> int:
    """Rows per tile: the average group size rounded down to a power of two, in [8, 512]."""
    return int(min(512, max(8, 2 ** math.floor(math.log2(max(1, m // g))))))


def _tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    m, g = lhs.shape[0], rhs.shape[0]
    num_tiles = -(-m // tile) + g  # sum_g ceil(size_g / tile) <= M / tile + G
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes  # first sorted row of each group
    tiles_per_group = -(-sizes // tile)
    tile_ends = jnp.cumsum(tiles_per_group)
    padded_starts = (tile_ends - tiles_per_group) * tile  # first padded row of each group
    # padded row r -> (its group, the sorted row it holds or -1)
    tile_group = jnp.minimum(jnp.searchsorted(tile_ends, jnp.arange(num_tiles), side="right"), g - 1)
    r = jnp.arange(num_tiles * tile)
    rg = jnp.repeat(tile_group, tile)
    offset = r - padded_starts[rg]
    valid = (offset < sizes[rg]) & (r < tile_ends[-1] * tile)
    src = jnp.where(valid, starts[rg] + offset, 0)
    x = jnp.where(valid[:, None], lhs[src], 0).reshape(num_tiles, tile, lhs.shape[1])
    y = jnp.einsum("TMK,TKN->TMN", x, rhs[tile_group], preferred_element_type=jnp.float32)
    # sorted row i -> its padded row; rows past sum(group_sizes) are zero
    row = jnp.arange(m)
    row_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), g - 1)
    pos = padded_starts[row_group] + row - starts[row_group]
    out = y.reshape(num_tiles * tile, -1)[pos]
    return jnp.where((row < jnp.sum(sizes))[:, None], out, 0)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tile: int = 0) -> jax.Array:
    """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] int -> [M, N] in lhs's dtype."""
    if impl == "auto":
        impl = "ragged_dot" if jax.default_backend() == "tpu" else "tiled"
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    elif impl == "tiled":
        out = _tiled(lhs, rhs, group_sizes, tile or default_tile(lhs.shape[0], rhs.shape[0]))
    elif impl == "pallas":
        from pallas_kernels.gmm import gmm  # noqa: PLC0415  (optional until the kernel lands)
        out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; known: {GMM_IMPLS}")
    return out.astype(lhs.dtype)
