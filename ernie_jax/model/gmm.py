"""Grouped matmul: `out[rows of group g] = lhs[rows of group g] @ rhs[g]`, rows sorted by group.

Implementations, chosen by `ErnieConfig.moe_gmm_impl`:
- `ragged_dot`: `jax.lax.ragged_dot`, the fast path on TPU. On CPU XLA lowers it to a dense
  computation over every group, so its cost grows with the number of experts.
- `tiled`: plain JAX. Each group is padded to whole tiles of `tile` rows cut from the sorted order,
  so every tile belongs to one group; one batched matmul then runs over all tiles with each tile's
  expert weights `rhs[tile_group]`. Work is (M + G * tile) rows, about 2M with the default tile ~ M / G,
  but the small tiles and the per-tile weight gather (and its scatter-add gradient) grow with G.
- `bucketed`: plain JAX. Every group gets a bucket of C rows, [G, C, K], C the smallest of a few
  capacities (1.25x .. 3x the mean group size M / G) that holds the largest group, picked at run time with
  `lax.switch`; `rhs` is used as is (no per-tile weight gather) and the weight gradient is one
  `einsum("GCK,GCN->GKN")`. Work is G * C rows (1.25M .. 3M, set by the largest group). If even the largest
  capacity is too small (heavy skew) the last branch is `tiled` with tiles of >= 128 rows, so it stays
  dropless for any group sizes. Its own `custom_vjp`, see `_bucketed`.
- `pallas`: the Pallas kernel of `pallas_kernels.gmm` (its own issue).
`auto` picks `ragged_dot` on TPU and `bucketed` elsewhere. CPU: it keeps the MoE block's step time nearly flat
in the number of experts at equal active parameters, where `tiled` grows 1.7x from 8 to 64 experts
(docs/benchmarks.md, MoE scaling). GPU: on an H200 (jax 0.11.2, bf16, 21B-A3B up-proj: M 24576, K 2560,
N 1536, 64 groups, max / mean group 1.4 and 2.5) `bucketed` took 0.95 / 1.5 ms forward and 2.4 / 3.7 ms
forward+backward, `tiled` 1.9 and 12.5 ms, `ragged_dot` 16.5 and 106 ms. Rows past sum(group_sizes) come out
zero; sum(group_sizes) <= M is assumed. `bucketed` (a custom_vjp) supports reverse-mode autodiff and vmap,
not forward mode (`jax.jvp`).
"""

from __future__ import annotations

import functools
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


# --- bucketed ----------------------------------------------------------------------------------------------
# Bucket capacities as multiples of the mean group size M / G. The step time of a branch is ~ f * M rows of
# matmul, so finer factors waste less padding at the price of one more branch to compile (forward and backward).
BUCKET_FACTORS = (1.25, 1.5, 2.0, 3.0)
FALLBACK_MIN_TILE = 128  # the skewed fallback's tile: few tiles, so few gathered expert weights


def bucket_capacities(m: int, g: int) -> tuple[int, ...]:
    """Rows per group of each bucketed branch, ascending: ceil8(f * M / G) for f in BUCKET_FACTORS, at most M."""
    return tuple(sorted({min(m, 8 * math.ceil(f * m / g / 8)) for f in BUCKET_FACTORS}))


def bucket_branch(group_sizes: jax.Array, caps: tuple[int, ...]) -> jax.Array:
    """Index of the smallest capacity >= max(group_sizes); len(caps) (the `tiled` fallback) if none is."""
    return jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.max(group_sizes), side="left").astype(jnp.int32)


def _fallback_tile(m: int, g: int, tile: int) -> int:
    return tile or min(max(FALLBACK_MIN_TILE, default_tile(m, g)), 8 * max(1, -(-m // 8)))


def _bucket_maps(sizes: jax.Array, m: int, c: int):
    """Index maps between the sorted rows [M] and the buckets [G * C] (bucket g holds group g's rows, then zeros).

    src[b], valid[b]: the sorted row that bucket row b holds (valid only for b's first sizes[g] rows);
    pos[r], rvalid[r]: the bucket row that sorted row r went to (valid for r < sum(sizes)). Both directions are
    gathers, so neither the forward nor the backward pass needs a scatter.
    """
    g = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    j = jnp.arange(c)
    valid = (j[None, :] < sizes[:, None]).reshape(-1)
    src = jnp.where(valid, (starts[:, None] + j[None, :]).reshape(-1), 0)
    row = jnp.arange(m)
    row_group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), g - 1)
    offset = row - starts[row_group]
    # offset < c always holds in the branch that `bucket_branch` picks; the check keeps the other branches
    # in range when vmap turns the switch into a select that evaluates all of them
    rvalid = (row < ends[-1]) & (offset < c)
    pos = jnp.where(rvalid, row_group * c + offset, 0)
    return src, valid, pos, rvalid


def _to_buckets(a: jax.Array, src: jax.Array, valid: jax.Array, g: int, c: int) -> jax.Array:
    """[M, D] sorted rows -> [G, C, D], padding rows zero."""
    return jnp.where(valid[:, None], a[src], 0).reshape(g, c, a.shape[-1])


def _from_buckets(y: jax.Array, pos: jax.Array, rvalid: jax.Array) -> jax.Array:
    """[G, C, D] -> [M, D] sorted rows, rows past sum(group_sizes) zero."""
    return jnp.where(rvalid[:, None], y.reshape(-1, y.shape[-1])[pos], 0)


def _bucket_fwd(c: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    g = rhs.shape[0]
    src, valid, pos, rvalid = _bucket_maps(sizes, lhs.shape[0], c)
    y = jnp.einsum("GCK,GKN->GCN", _to_buckets(lhs, src, valid, g, c), rhs, preferred_element_type=jnp.float32)
    return _from_buckets(y, pos, rvalid).astype(lhs.dtype)


def _bucket_bwd(c: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    g = rhs.shape[0]
    src, valid, pos, rvalid = _bucket_maps(sizes, lhs.shape[0], c)
    dyb = _to_buckets(dy, src, valid, g, c)  # [G, C, N]; zero on padding rows, so they add nothing to dw
    dx = jnp.einsum("GCN,GKN->GCK", dyb, rhs, preferred_element_type=jnp.float32)
    dw = jnp.einsum("GCK,GCN->GKN", _to_buckets(lhs, src, valid, g, c), dyb, preferred_element_type=jnp.float32)
    return _from_buckets(dx, pos, rvalid).astype(lhs.dtype), dw.astype(rhs.dtype)


def _fallback_fwd(tile: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    return _tiled(lhs, rhs, sizes, tile).astype(lhs.dtype)


def _fallback_bwd(tile: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    _, vjp = jax.vjp(lambda a, b: _fallback_fwd(tile, a, b, sizes), lhs, rhs)  # unused primal: removed by XLA
    return vjp(dy)


def _vma(x: jax.Array) -> frozenset:
    """The shard_map mesh axes that x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; `vma` in other versions
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _all_varying(*xs: jax.Array) -> list[jax.Array]:
    """Inside shard_map (e.g. expert parallelism: weights vary over `expert`, rows over `fsdp` too): cast every
    operand to vary over the union of their axes before the switch. Otherwise AD of a branch transposes the
    implicit cast of a less-varying operand into a psum, a collective inside a branch that shards may not all
    take (each picks its branch from its own group sizes), and the branches' output types would differ."""
    axes = frozenset().union(*map(_vma, xs))
    return [jax.lax.pcast(x, tuple(sorted(axes - _vma(x))), to="varying") if axes - _vma(x) else x for x in xs]


def _sum_to(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent of a cast-to-varying operand: summed over the axes the primal does not vary over,
    outside the switch (the transpose of `_all_varying`)."""
    extra = tuple(sorted(_vma(ct) - _vma(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bucketed(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, caps: tuple[int, ...], tile: int) -> jax.Array:
    """The `bucketed` grouped matmul; sizes int32. caps: bucket_capacities(M, G); tile: the fallback's tile.

    A custom_vjp because differentiating `lax.switch` directly makes its forward return the residuals of every
    branch (zeros for those not taken, [G, C, K]-sized for each bucket) and its backward carry them all. Here
    the forward keeps only (lhs, rhs, sizes) and the backward is a second switch on the same index, each
    branch regathering what it needs: dx = buckets(dy) @ rhs^T, dw = buckets(lhs)^T @ buckets(dy).
    """
    branches = [functools.partial(_bucket_fwd, c) for c in caps] + [functools.partial(_fallback_fwd, tile)]
    return jax.lax.switch(bucket_branch(sizes, caps), branches, *_all_varying(lhs, rhs, sizes))


def _bucketed_fwd(lhs, rhs, sizes, caps, tile):
    return _bucketed(lhs, rhs, sizes, caps, tile), (lhs, rhs, sizes)


def _bucketed_bwd(caps, tile, res, dy):
    lhs, rhs, sizes = res
    branches = [functools.partial(_bucket_bwd, c) for c in caps] + [functools.partial(_fallback_bwd, tile)]
    dx, dw = jax.lax.switch(bucket_branch(sizes, caps), branches, *_all_varying(lhs, rhs, sizes, dy))
    return _sum_to(dx, lhs), _sum_to(dw, rhs), None  # no cotangent for the integer group sizes


_bucketed.defvjp(_bucketed_fwd, _bucketed_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tile: int = 0) -> jax.Array:
    """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] int -> [M, N] in lhs's dtype.

    tile: rows per tile of `tiled`, and of `bucketed`'s skewed fallback (0 = from shapes).
    """
    if impl == "auto":
        impl = "ragged_dot" if jax.default_backend() == "tpu" else "bucketed"
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    elif impl == "tiled":
        out = _tiled(lhs, rhs, group_sizes, tile or default_tile(lhs.shape[0], rhs.shape[0]))
    elif impl == "bucketed":
        m, g = lhs.shape[0], rhs.shape[0]
        out = _bucketed(lhs, rhs, group_sizes.astype(jnp.int32), bucket_capacities(m, g), _fallback_tile(m, g, tile))
    elif impl == "pallas":
        from pallas_kernels.gmm import gmm  # noqa: PLC0415  (optional until the kernel lands)
        out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; known: {GMM_IMPLS}")
    return out.astype(lhs.dtype)
