"""Grouped matmul: `out[rows of group g] = lhs[rows of group g] @ rhs[g]`, rows sorted by group.

Implementations, chosen by `ErnieConfig.moe_gmm_impl`:
- `ragged_dot`: `jax.lax.ragged_dot`, the fast path on TPU. On CPU XLA lowers it to a dense
  computation over every group, so its cost grows with the number of experts.
- `tiled`: plain JAX. Each group is padded to whole tiles of `tile` rows cut from the sorted order,
  so every tile belongs to one group; one batched matmul then runs over all tiles with each tile's
  expert weights `rhs[tile_group]`. Work is (M + G * tile) rows, about 2M with the default tile ~ M / G,
  but the small tiles and the per-tile weight gather (and its scatter-add gradient) grow with G.
- `bucketed`: plain JAX. Every group gets a bucket of its first c rows, [G, c, K], one batched matmul with
  `rhs` as is, and the rows past c of the busier groups go to n overflow tiles of t rows, [n, t, K], each
  tile one group's (a weight gather per tile). (c, n, t) is one of a few branches (c from the mean group
  size M / G to 2x it), the cheapest whose tiles hold the overflow, picked at run time with `lax.switch`.
  Work is G * c + n * t rows (1.03M at 8 and 1.09M at 64 experts with the 4096-token loads of the MoE
  benchmark, where one bucket sized by the busiest group needed 1.25M and 1.5M). Past the last branch
  (heavy skew) the fallback is `tiled` with tiles of >= 128 rows, so it stays dropless for any group sizes.
  Its own `custom_vjp`, see `_bucketed`.
- `pallas`: the Pallas kernel of `pallas_kernels.gmm` (its own issue).
`auto` picks `ragged_dot` on TPU and `bucketed` elsewhere. CPU: from 8 to 64 experts at equal active
parameters the MoE block's step time grows ~1.15-1.25x at 4096 tokens (the no-dispatch floor ~1.0-1.07x) and
~1.3-1.4x at 1024 tokens (the floor as much), `tiled`'s 1.4-1.9x (docs/benchmarks.md, MoE scaling).
GPU: on an H200 (jax 0.11.2, bf16, 21B-A3B up-proj: M 24576, K 2560, N 1536, 64 groups, max / mean group
1.4 and 2.5) the previous bucket-only layout of `bucketed` took 0.95 / 1.5 ms forward and 2.4 / 3.7 ms
forward+backward, `tiled` 1.9 and 12.5 ms, `ragged_dot` 16.5 and 106 ms (not re-measured with the overflow
tiles). Rows past sum(group_sizes) come out zero; sum(group_sizes) <= M is assumed. `bucketed` (a
custom_vjp) supports reverse-mode autodiff and vmap, not forward mode (`jax.jvp`).
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


def _group_of(ends: jax.Array, length: int) -> jax.Array:
    """[length]: for each position p, the number of `ends` <= p, i.e. the group that p falls into when group g
    ends (exclusive) at ends[g] (= searchsorted(ends, p, side="right"), as a scatter of counts and a cumsum:
    cheaper to compile than searchsorted's loop)."""
    return jnp.cumsum(jnp.zeros(length, jnp.int32).at[ends].add(1, mode="drop"))


def _tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    m, g = lhs.shape[0], rhs.shape[0]
    num_tiles = -(-m // tile) + g  # sum_g ceil(size_g / tile) <= M / tile + G
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes  # first sorted row of each group
    tiles_per_group = -(-sizes // tile)
    tile_ends = jnp.cumsum(tiles_per_group)
    padded_starts = (tile_ends - tiles_per_group) * tile  # first padded row of each group
    # padded row r -> (its group, the sorted row it holds or -1)
    tile_group = jnp.minimum(_group_of(tile_ends, num_tiles), g - 1)
    r = jnp.arange(num_tiles * tile)
    rg = jnp.broadcast_to(tile_group[:, None], (num_tiles, tile)).reshape(-1)
    offset = r - padded_starts[rg]
    valid = (offset < sizes[rg]) & (r < tile_ends[-1] * tile)
    src = jnp.where(valid, starts[rg] + offset, 0)
    x = jnp.where(valid[:, None], lhs[src], 0).reshape(num_tiles, tile, lhs.shape[1])
    y = jnp.einsum("TMK,TKN->TMN", x, rhs[tile_group], preferred_element_type=jnp.float32)
    # sorted row i -> its padded row; rows past sum(group_sizes) are zero
    row = jnp.arange(m)
    row_group = jnp.minimum(_group_of(jnp.cumsum(sizes), m), g - 1)
    pos = padded_starts[row_group] + row - starts[row_group]
    out = y.reshape(num_tiles * tile, -1)[pos]
    return jnp.where((row < jnp.sum(sizes))[:, None], out, 0)


# --- bucketed ----------------------------------------------------------------------------------------------
# A branch (c, n, t) lays the sorted rows out as buckets [G, c] (group g's first c rows, then zeros), one batched
# matmul against rhs as is, and n overflow tiles [n, t] holding the rows past c of the groups larger than c
# (each tile one group's, against its gathered weight rhs[tile_group]). Besides its t rows a tile costs its
# expert weight gathered, packed and its gradient added back: about TILE_OVERHEAD rows of matmul on the 2-core
# CPU host of docs/benchmarks.md (measured from unused tiles). So c at the mean group size with tiles for the
# busier experts beats one bucket sized by the busiest expert (1.4x the mean at 64 experts with the loads of
# docs/benchmarks.md, MoE scaling), and the branches are tried by that cost, G * c + n * (t + TILE_OVERHEAD).
# (c, n, t) per branch as (c / mean group, n / G, t / mean group): at c = mean about half the groups overflow,
# each by a little (small tiles, many); past c = 1.125 x mean only the tail does. Every branch is compiled
# (forward and backward), so the list is short; loads past the last branch take the `tiled` fallback.
BRANCH_SPECS = ((1.0, 1 / 2, 1 / 8), (1.0, 3 / 4, 1 / 8), (1.125, 1 / 4, 1 / 4), (1.5, 1 / 4, 1 / 4),
                (2.0, 1 / 4, 1 / 4))
TILE_RANGE = (16, 128)  # overflow tile rows: a power of two in this range
TILE_OVERHEAD = 32  # rows of matmul a tile costs beyond its own rows (branch order only)
FALLBACK_MIN_TILE = 128  # the skewed fallback's tile: few tiles, so few gathered expert weights


def bucket_branches(m: int, g: int) -> tuple[tuple[int, int, int], ...]:
    """(c, n, t) of each bucketed branch by ascending cost G * c + n * (t + TILE_OVERHEAD), from BRANCH_SPECS with
    the mean group size M / G: c = ceil8(f * mean) (at most M), n = ceil(v * G), t = the power of two <= u * mean
    in TILE_RANGE (at most ceil8(M)). A branch with c = M (holds any group, no tiles) ends the list."""
    mean = m / g
    out = set()
    for f, v, u in BRANCH_SPECS:
        c = min(m, 8 * math.ceil(f * mean / 8))
        t = 2 ** math.floor(math.log2(max(1.0, u * mean)))
        t = min(TILE_RANGE[1], max(TILE_RANGE[0], t), 8 * math.ceil(m / 8))
        out.add((c, 0, 0) if c == m else (c, math.ceil(v * g), t))  # c = M holds any group: no tiles
    branches = sorted(out, key=lambda b: (g * b[0] + b[1] * (b[2] + TILE_OVERHEAD), b))
    full = next((i for i, b in enumerate(branches) if b[0] == m), len(branches))
    return tuple(branches[:full + 1])  # none after c = M is ever taken


def overflow_tiles(group_sizes: jax.Array, c: int, t: int) -> jax.Array:
    """[] the tiles of t rows that the rows past c of every group fill."""
    return jnp.sum(-(-jnp.maximum(group_sizes.astype(jnp.int32) - c, 0) // max(t, 1)))


def bucket_branch(group_sizes: jax.Array, branches: tuple[tuple[int, int, int], ...]) -> jax.Array:
    """Index of the first branch whose n overflow tiles hold every group's rows past c; len(branches) (the
    `tiled` fallback) if none does."""
    fits = jnp.stack([overflow_tiles(group_sizes, c, t) <= n for c, n, t in branches])
    return jnp.where(jnp.any(fits), jnp.argmax(fits), len(branches)).astype(jnp.int32)


def _fallback_tile(m: int, g: int, tile: int) -> int:
    return tile or min(max(FALLBACK_MIN_TILE, default_tile(m, g)), 8 * max(1, -(-m // 8)))


def _bucket_maps(sizes: jax.Array, m: int, c: int, n: int, t: int):
    """Index maps between the sorted rows [M] and a branch's rows [R = G * c + n * t] (buckets, then tiles).

    src[b], valid[b]: the sorted row that branch row b holds; pos[r], rvalid[r]: the branch row that sorted row
    r went to (valid for r < sum(sizes)); tile_group[n]: each tile's group (G - 1 for unused, all-zero tiles).
    Both directions are gathers, so neither the forward nor the backward pass needs a scatter of rows.
    """
    g = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    j = jnp.arange(c)
    bvalid = (j[None, :] < sizes[:, None]).reshape(-1)
    bsrc = (starts[:, None] + j[None, :]).reshape(-1)
    over = jnp.maximum(sizes - c, 0)  # rows past the bucket, padded to whole tiles
    tiles = -(-over // t)
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    tile_group = jnp.minimum(_group_of(tile_ends, n), g - 1)
    r = jnp.arange(n * t)
    rg = jnp.broadcast_to(tile_group[:, None], (n, t)).reshape(-1)
    off = r - tile_starts[rg] * t  # position among group rg's overflow rows
    ovalid = (off < over[rg]) & (r < tile_ends[-1] * t)
    valid = jnp.concatenate([bvalid, ovalid])
    src = jnp.where(valid, jnp.concatenate([bsrc, starts[rg] + c + off]), 0)
    row = jnp.arange(m)
    row_group = jnp.minimum(_group_of(ends, m), g - 1)
    offset = row - starts[row_group]
    pos = jnp.where(offset < c, row_group * c + offset, g * c + tile_starts[row_group] * t + offset - c)
    # pos < R always holds in the branch that `bucket_branch` picks; the check keeps the other branches in range
    # when vmap turns the switch into a select that evaluates all of them
    rvalid = (row < ends[-1]) & (pos < g * c + n * t)
    return src, valid, jnp.where(rvalid, pos, 0), rvalid, tile_group


def _gather(a: jax.Array, src: jax.Array, valid: jax.Array) -> jax.Array:
    """a[src] with the rows where not valid zero."""
    return jnp.where(valid[:, None], a[src], 0)


def _split(a: jax.Array, g: int, c: int, n: int, t: int) -> tuple[jax.Array, jax.Array]:
    """Branch rows [R, D] -> buckets [G, c, D], tiles [n, t, D]."""
    return a[:g * c].reshape(g, c, a.shape[-1]), a[g * c:].reshape(n, t, a.shape[-1])


def _bmm(spec: str, b: jax.Array, o: jax.Array, wb: jax.Array, wo: jax.Array) -> jax.Array:
    """The same einsum on the buckets (weights wb) and the tiles (wo), joined into rows [R, N]."""
    y = [jnp.einsum(spec, x, w, preferred_element_type=jnp.float32) for x, w in ((b, wb), (o, wo)) if x.size]
    return jnp.concatenate([a.reshape(-1, a.shape[-1]) for a in y])


def _bucket_fwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    g = rhs.shape[0]
    src, valid, pos, rvalid, tile_group = _bucket_maps(sizes, lhs.shape[0], c, n, t)
    xb, xo = _split(_gather(lhs, src, valid), g, c, n, t)
    y = _bmm("GCK,GKN->GCN", xb, xo, rhs, rhs[tile_group])
    return _gather(y, pos, rvalid).astype(lhs.dtype)


def _bucket_bwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    g = rhs.shape[0]
    src, valid, pos, rvalid, tile_group = _bucket_maps(sizes, lhs.shape[0], c, n, t)
    wo = rhs[tile_group]
    xb, xo = _split(_gather(lhs, src, valid), g, c, n, t)
    db, do = _split(_gather(dy, src, valid), g, c, n, t)  # zero on padding rows: they add nothing to dw
    dx = _bmm("GCN,GKN->GCK", db, do, rhs, wo)
    dw = jnp.einsum("GCK,GCN->GKN", xb, db, preferred_element_type=jnp.float32)
    if n:
        dw = dw.at[tile_group].add(jnp.einsum("TCK,TCN->TKN", xo, do, preferred_element_type=jnp.float32))
    return _gather(dx, pos, rvalid).astype(lhs.dtype), dw.astype(rhs.dtype)


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
def _bucketed(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, branches: tuple[tuple[int, int, int], ...],
              tile: int) -> jax.Array:
    """The `bucketed` grouped matmul; sizes int32. branches: bucket_branches(M, G); tile: the fallback's tile.

    A custom_vjp because differentiating `lax.switch` directly makes its forward return the residuals of every
    branch (zeros for those not taken, [G, C, K]-sized for each bucket) and its backward carry them all. Here
    the forward keeps only (lhs, rhs, sizes) and the backward is a second switch on the same index, each
    branch regathering what it needs: dx = rows(dy) @ rhs^T, dw = rows(lhs)^T @ rows(dy) (tiles summed per group).
    """
    fns = [functools.partial(_bucket_fwd, *b) for b in branches] + [functools.partial(_fallback_fwd, tile)]
    return jax.lax.switch(bucket_branch(sizes, branches), fns, *_all_varying(lhs, rhs, sizes))


def _bucketed_fwd(lhs, rhs, sizes, branches, tile):
    return _bucketed(lhs, rhs, sizes, branches, tile), (lhs, rhs, sizes)


def _bucketed_bwd(branches, tile, res, dy):
    lhs, rhs, sizes = res
    fns = [functools.partial(_bucket_bwd, *b) for b in branches] + [functools.partial(_fallback_bwd, tile)]
    dx, dw = jax.lax.switch(bucket_branch(sizes, branches), fns, *_all_varying(lhs, rhs, sizes, dy))
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
        out = _bucketed(lhs, rhs, group_sizes.astype(jnp.int32), bucket_branches(m, g), _fallback_tile(m, g, tile))
    elif impl == "pallas":
        from pallas_kernels.gmm import gmm  # noqa: PLC0415  (optional until the kernel lands)
        out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    else:
        raise ValueError(f"unknown grouped-matmul impl {impl!r}; known: {GMM_IMPLS}")
    return out.astype(lhs.dtype)
