"""The `tiled` grouped matmul: each group padded to whole tiles of `tile` rows cut from the sorted order, so
every tile belongs to one group, then one batched matmul over all tiles against each tile's expert weights
`rhs[tile_group]`. Work is M + G * tile rows; the per-tile weight gather (and its scatter-add gradient) grows
with G. Also `bucketed`'s fallback for heavily skewed loads."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def default_tile(m: int, g: int) -> int:
    """Rows per tile: the average group size rounded down to a power of two, in [8, 512]."""
    return int(min(512, max(8, 2 ** math.floor(math.log2(max(1, m // g))))))


def group_of(ends: jax.Array, length: int) -> jax.Array:
    """[length]: for each position p, the number of `ends` <= p, i.e. the group that p falls into when group g
    ends (exclusive) at ends[g] (= searchsorted(ends, p, side="right"), as a scatter of counts and a cumsum:
    cheaper to compile than searchsorted's loop)."""
    return jnp.cumsum(jnp.zeros(length, jnp.int32).at[ends].add(1, mode="drop"))


def tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] -> [M, N] fp32; rows past
    sum(group_sizes) zero. Differentiable by plain autodiff."""
    m, g = lhs.shape[0], rhs.shape[0]
    num_tiles = -(-m // tile) + g  # sum_g ceil(size_g / tile) <= M / tile + G
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes  # first sorted row of each group
    tiles_per_group = -(-sizes // tile)
    tile_ends = jnp.cumsum(tiles_per_group)
    padded_starts = (tile_ends - tiles_per_group) * tile  # first padded row of each group
    # padded row r -> (its group, the sorted row it holds or -1)
    tile_group = jnp.minimum(group_of(tile_ends, num_tiles), g - 1)
    r = jnp.arange(num_tiles * tile)
    rg = jnp.broadcast_to(tile_group[:, None], (num_tiles, tile)).reshape(-1)
    offset = r - padded_starts[rg]
    valid = (offset < sizes[rg]) & (r < tile_ends[-1] * tile)
    src = jnp.where(valid, starts[rg] + offset, 0)
    x = jnp.where(valid[:, None], lhs[src], 0).reshape(num_tiles, tile, lhs.shape[1])
    y = jnp.einsum("TMK,TKN->TMN", x, rhs[tile_group], preferred_element_type=jnp.float32)
    # sorted row i -> its padded row; rows past sum(group_sizes) are zero
    row = jnp.arange(m)
    row_group = jnp.minimum(group_of(jnp.cumsum(sizes), m), g - 1)
    pos = padded_starts[row_group] + row - starts[row_group]
    out = y.reshape(num_tiles * tile, -1)[pos]
    return jnp.where((row < jnp.sum(sizes))[:, None], out, 0)
