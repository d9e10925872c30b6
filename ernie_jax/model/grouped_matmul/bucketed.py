"""The `bucketed` grouped matmul, the CPU default: every group gets a bucket of its first c rows, [G, c, K],
one batched matmul against `rhs` as is, and the rows past c of the busier groups go to n overflow tiles of t
rows, [n, t, K], each tile one group's (a weight gather per tile). Work is G * c + n * t rows, close to M for
roughly balanced loads, where one bucket sized by the busiest group would cost G times that group's size.

(c, n, t) is one of a few branches (c from the mean group size M / G to 2x it), the cheapest whose tiles hold
the overflow, picked at run time with `lax.switch`; past the last branch (heavy skew) the fallback is `tiled`
with tiles of >= FALLBACK_MIN_TILE rows, so it stays dropless for any group sizes. Its own custom_vjp
(`bucketed` below): reverse-mode autodiff and vmap, not forward mode (`jax.jvp`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ernie_jax.model.grouped_matmul.tiled import default_tile, group_of, tiled
from ernie_jax.model.grouped_matmul.varying import all_varying, sum_to

# A branch (c, n, t) lays the sorted rows out as buckets [G, c] (group g's first c rows, then zeros), one batched
# matmul against rhs as is, and n overflow tiles [n, t] holding the rows past c of the groups larger than c
# (each tile one group's, against its gathered weight rhs[tile_group]). Besides its t rows a tile costs its
# expert weight gathered, packed and its gradient added back, about TILE_OVERHEAD rows of matmul on CPU. So c
# at the mean group size with tiles for the busier experts beats one bucket sized by the busiest expert, and
# the branches are tried by that cost, G * c + n * (t + TILE_OVERHEAD).
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


def fallback_tile(m: int, g: int, tile: int) -> int:
    """Rows per tile of the skewed fallback: `tile` if given, else >= FALLBACK_MIN_TILE (at most ceil8(M))."""
    return tile or min(max(FALLBACK_MIN_TILE, default_tile(m, g)), 8 * max(1, -(-m // 8)))


class Layout(NamedTuple):
    """Index maps between the sorted rows [M] and one branch's buckets [G, c] and tiles [n, t].

    bsrc/bvalid [G * c], osrc/ovalid [n * t]: the sorted row that each bucket / tile row holds (zero where not
    valid); pos [M], rvalid [M]: the bucket row (pos < G * c) or tile row (G * c + tile row) that sorted row r
    went to (valid for r < sum(sizes)); tile_group [n]: each tile's group (G - 1 for unused, all-zero tiles).
    Buckets and tiles are gathered into separate arrays and gathered back from both at once, so no rows are
    concatenated or sliced apart around the matmuls, and no direction needs a scatter of rows."""

    g: int
    c: int
    n: int
    t: int
    bsrc: jax.Array
    bvalid: jax.Array
    osrc: jax.Array
    ovalid: jax.Array
    pos: jax.Array
    rvalid: jax.Array
    tile_group: jax.Array

    def to(self, a: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Sorted rows [M, D] -> (buckets [G, c, D], tiles [n, t, D] or None when n = 0)."""
        d = a.shape[-1]
        xb = _gather(a, self.bsrc, self.bvalid).reshape(self.g, self.c, d)
        return xb, _gather(a, self.osrc, self.ovalid).reshape(self.n, self.t, d) if self.n else None

    def back(self, yb: jax.Array, yo: jax.Array | None) -> jax.Array:
        """(buckets, tiles) -> sorted rows [M, D], rows past sum(sizes) zero."""
        gc, d = self.g * self.c, yb.shape[-1]
        y = yb.reshape(gc, d)[jnp.minimum(self.pos, gc - 1)]
        if yo is not None:
            yt = yo.reshape(-1, d)[jnp.clip(self.pos - gc, 0, self.n * self.t - 1)]
            y = jnp.where((self.pos < gc)[:, None], y, yt)
        return jnp.where(self.rvalid[:, None], y, 0)


def bucket_layout(sizes: jax.Array, m: int, c: int, n: int, t: int) -> Layout:
    """The `Layout` of branch (c, n, t) for these group sizes (int32) and M sorted rows."""
    g = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    j = jnp.arange(c)
    bvalid = (j[None, :] < sizes[:, None]).reshape(-1)
    bsrc = jnp.where(bvalid, (starts[:, None] + j[None, :]).reshape(-1), 0)
    over = jnp.maximum(sizes - c, 0)  # rows past the bucket, padded to whole tiles
    tiles = -(-over // max(t, 1))
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    tile_group = jnp.minimum(group_of(tile_ends, n), g - 1)
    r = jnp.arange(n * t)
    rg = jnp.broadcast_to(tile_group[:, None], (n, t)).reshape(-1)
    off = r - tile_starts[rg] * t  # position among group rg's overflow rows
    ovalid = (off < over[rg]) & (r < tile_ends[-1] * t)
    osrc = jnp.where(ovalid, starts[rg] + c + off, 0)
    row = jnp.arange(m)
    row_group = jnp.minimum(group_of(ends, m), g - 1)
    offset = row - starts[row_group]
    pos = jnp.where(offset < c, row_group * c + offset, g * c + tile_starts[row_group] * t + offset - c)
    # pos < R always holds in the branch that `bucket_branch` picks; the check keeps the other branches in range
    # when vmap turns the switch into a select that evaluates all of them
    rvalid = (row < ends[-1]) & (pos < g * c + n * t)
    return Layout(g, c, n, t, bsrc, bvalid, osrc, ovalid, jnp.where(rvalid, pos, 0), rvalid, tile_group)


def _gather(a: jax.Array, src: jax.Array, valid: jax.Array) -> jax.Array:
    """a[src] with the rows where not valid zero."""
    return jnp.where(valid[:, None], a[src], 0)


def bmm(spec: str, xb: jax.Array, xo: jax.Array | None, w: jax.Array, tile_group: jax.Array):
    """The same einsum on the buckets (weights w [G, ...]) and the tiles (w[tile_group], gathered per tile)."""
    mm = functools.partial(jnp.einsum, spec, preferred_element_type=jnp.float32)
    return mm(xb, w), None if xo is None else mm(xo, w[tile_group])


def weight_grad(lay: Layout, xb, xo, db, do) -> jax.Array:
    """[G, K, N]: sum over each group's rows of x^T dy, bucket rows plus its tiles' rows."""
    dw = jnp.einsum("GCK,GCN->GKN", xb, db, preferred_element_type=jnp.float32)
    if xo is None:
        return dw
    return dw.at[lay.tile_group].add(jnp.einsum("TCK,TCN->TKN", xo, do, preferred_element_type=jnp.float32))


def _bucket_fwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    lay = bucket_layout(sizes, lhs.shape[0], c, n, t)
    return lay.back(*bmm("GCK,GKN->GCN", *lay.to(lhs), rhs, lay.tile_group)).astype(lhs.dtype)


def _bucket_bwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    lay = bucket_layout(sizes, lhs.shape[0], c, n, t)
    (xb, xo), (db, do) = lay.to(lhs), lay.to(dy)  # zero on padding rows: they add nothing to dw
    dx = lay.back(*bmm("GCN,GKN->GCK", db, do, rhs, lay.tile_group))
    return dx.astype(lhs.dtype), weight_grad(lay, xb, xo, db, do).astype(rhs.dtype)


def _fallback_fwd(tile: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    return tiled(lhs, rhs, sizes, tile).astype(lhs.dtype)


def _fallback_bwd(tile: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    _, vjp = jax.vjp(lambda a, b: _fallback_fwd(tile, a, b, sizes), lhs, rhs)  # unused primal: removed by XLA
    return vjp(dy)


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
    return jax.lax.switch(bucket_branch(sizes, branches), fns, *all_varying(lhs, rhs, sizes))


def _bucketed_fwd(lhs, rhs, sizes, branches, tile):
    return _bucketed(lhs, rhs, sizes, branches, tile), (lhs, rhs, sizes)


def _bucketed_bwd(branches, tile, res, dy):
    lhs, rhs, sizes = res
    fns = [functools.partial(_bucket_bwd, *b) for b in branches] + [functools.partial(_fallback_bwd, tile)]
    dx, dw = jax.lax.switch(bucket_branch(sizes, branches), fns, *all_varying(lhs, rhs, sizes, dy))
    return sum_to(dx, lhs), sum_to(dw, rhs), None  # no cotangent for the integer group sizes


_bucketed.defvjp(_bucketed_fwd, _bucketed_bwd)


def bucketed(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 0) -> jax.Array:
    """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] -> [M, N] in lhs's dtype (fp32
    accumulation), rows past sum(group_sizes) zero. tile: the skewed fallback's tile (0 = from shapes)."""
    m, g = lhs.shape[0], rhs.shape[0]
    return _bucketed(lhs, rhs, group_sizes.astype(jnp.int32), bucket_branches(m, g), fallback_tile(m, g, tile))
