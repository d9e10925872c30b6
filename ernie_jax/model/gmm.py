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
  Its own `custom_vjp`, see `_bucketed`. The MoE experts' SwiGLU runs fused on it (`expert_swiglu`): one
  layout per pass for gate, up, the activation and the down projection instead of one per matmul.
- `pallas`: the Pallas kernel of `pallas_kernels.gmm` (its own issue).
`auto` picks `ragged_dot` on TPU and `bucketed` elsewhere. CPU (docs/benchmarks.md, MoE scaling, 2 cores, median / min /
paired): from 8 to 64 experts at equal active parameters the MoE block's training step (gradients of the weights and of
the input) grows 1.26 / 1.28 / 1.28x at 8192 tokens (no-dispatch floor 1.12 / 1.09 / 1.11x) and 1.24 / 1.27 / 1.23x at
4096 (floor 1.11 / 1.10 / 1.12x; the run before 1.21 / 1.20 / 1.20x), 1.29x at 1024 (floor 1.36-1.78x: XLA:CPU runs [64,
64, 256] x [64, 256, 256] on one core); `tiled` 1.6x, CPU `ragged_dot` 9x. The issue's goal (<= 1.2) is missed on
XLA:CPU's kernels: the bare batched matmul is 1.15x slower at E = 64's per-expert shapes for the same FLOPs; the dw
matmuls (contracting over rows) are not lowered to YNNPACK as the others are and alone take 1.5x longer at E = 64 (20.8
vs 13.6 ms, 16384 rows; transposing an operand so that YNNPACK takes them cost more than it saved); per-expert dots of
the exact group sizes made the experts' step 2.5x slower at E = 64 than at E = 8. Past the floor the cost is mostly the
overflow tiles (4096 tokens, E = 64: 48 tiles of 32 rows, 9% of the rows, ~20% of the experts' step: small single-core
matmuls, weight gathers, dw scatter-adds) and the branch switch (3% of the experts' step at E = 8, 7% at E = 64, vs the
picked branch called directly). With tcmalloc (no page faults, steps ~25% faster at every E) one run gave 1.26x / 1.44x
at 8192 / 4096 tokens (floor 1.12 / 1.20x): glibc's page faults were a cost flat in E that hid part of the growth. The
fused SwiGLU step's median was 3-9% below three `grouped_matmul` calls' (E=64: 410 vs 449 ms at 4096 tokens, 895 vs 983
ms at 8192, without the input gradient), though XLA's buffer estimate is larger (456 vs 328 MiB at 4096 tokens).
GPU: on an H200 (jax 0.11.2, bf16, 21B-A3B up-proj: M 24576, K 2560, N 1536, 64 groups, max / mean group
1.4 and 2.5) the previous bucket-only layout of `bucketed` took 0.95 / 1.5 ms forward and 2.4 / 3.7 ms
forward+backward, `tiled` 1.9 and 12.5 ms, `ragged_dot` 16.5 and 106 ms (not re-measured with the overflow
tiles). Rows past sum(group_sizes) come out zero; sum(group_sizes) <= M is assumed. `bucketed` (a
custom_vjp) supports reverse-mode autodiff and vmap, not forward mode (`jax.jvp`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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


class _Layout(NamedTuple):
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


def _bucket_maps(sizes: jax.Array, m: int, c: int, n: int, t: int) -> _Layout:
    """The `_Layout` of branch (c, n, t) for these group sizes (int32) and M sorted rows."""
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
    tile_group = jnp.minimum(_group_of(tile_ends, n), g - 1)
    r = jnp.arange(n * t)
    rg = jnp.broadcast_to(tile_group[:, None], (n, t)).reshape(-1)
    off = r - tile_starts[rg] * t  # position among group rg's overflow rows
    ovalid = (off < over[rg]) & (r < tile_ends[-1] * t)
    osrc = jnp.where(ovalid, starts[rg] + c + off, 0)
    row = jnp.arange(m)
    row_group = jnp.minimum(_group_of(ends, m), g - 1)
    offset = row - starts[row_group]
    pos = jnp.where(offset < c, row_group * c + offset, g * c + tile_starts[row_group] * t + offset - c)
    # pos < R always holds in the branch that `bucket_branch` picks; the check keeps the other branches in range
    # when vmap turns the switch into a select that evaluates all of them
    rvalid = (row < ends[-1]) & (pos < g * c + n * t)
    return _Layout(g, c, n, t, bsrc, bvalid, osrc, ovalid, jnp.where(rvalid, pos, 0), rvalid, tile_group)


def _gather(a: jax.Array, src: jax.Array, valid: jax.Array) -> jax.Array:
    """a[src] with the rows where not valid zero."""
    return jnp.where(valid[:, None], a[src], 0)


def _bmm(spec: str, xb: jax.Array, xo: jax.Array | None, w: jax.Array, tile_group: jax.Array):
    """The same einsum on the buckets (weights w [G, ...]) and the tiles (w[tile_group], gathered per tile)."""
    mm = functools.partial(jnp.einsum, spec, preferred_element_type=jnp.float32)
    return mm(xb, w), None if xo is None else mm(xo, w[tile_group])


def _dw(lay: _Layout, xb, xo, db, do) -> jax.Array:
    """[G, K, N]: sum over each group's rows of x^T dy, bucket rows plus its tiles' rows."""
    dw = jnp.einsum("GCK,GCN->GKN", xb, db, preferred_element_type=jnp.float32)
    if xo is None:
        return dw
    return dw.at[lay.tile_group].add(jnp.einsum("TCK,TCN->TKN", xo, do, preferred_element_type=jnp.float32))


def _bucket_fwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
    lay = _bucket_maps(sizes, lhs.shape[0], c, n, t)
    return lay.back(*_bmm("GCK,GKN->GCN", *lay.to(lhs), rhs, lay.tile_group)).astype(lhs.dtype)


def _bucket_bwd(c: int, n: int, t: int, lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, dy: jax.Array):
    lay = _bucket_maps(sizes, lhs.shape[0], c, n, t)
    (xb, xo), (db, do) = lay.to(lhs), lay.to(dy)  # zero on padding rows: they add nothing to dw
    dx = lay.back(*_bmm("GCN,GKN->GCK", db, do, rhs, lay.tile_group))
    return dx.astype(lhs.dtype), _dw(lay, xb, xo, db, do).astype(rhs.dtype)


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


# --- fused expert SwiGLU on the bucketed layout ------------------------------------------------------------
# `expert_swiglu` = grouped_matmul(act(grouped_matmul(x, wg)) * grouped_matmul(x, wu), wo) on one layout: the
# branch's maps are built once, x goes into the buckets and tiles once, gate, up, the activation and the down
# projection stay in the layout and only y comes back to the sorted rows (three grouped_matmul calls build,
# gather and ungather the layout three times in the forward and again in the backward). Gate and up are two
# matmuls on the same layout rather than one against [wg | wu]: concatenating the weights (and splitting their
# gradient) copies all E experts' weights every step, a cost that grows with E (at 64 experts it was ~5% slower
# than two matmuls in one function-level run, about this host's noise). The residuals are gate and up in
# sorted-row order (the backward regathers them rather than recompute the matmuls). XLA:CPU may run the gate and
# up matmuls concurrently; it drops `optimization_barrier`s, so they cannot be ordered from here.


def _pairs(f, *pairs):
    """f on the buckets of every (buckets, tiles) pair, and on the tiles (None when there are none)."""
    b = f(*(p[0] for p in pairs))
    return b, None if pairs[0][1] is None else f(*(p[1] for p in pairs))


def _swiglu_bucket_fwd(c: int, n: int, t: int, act, res: bool, x, wg, wu, wo, sizes):
    lay = _bucket_maps(sizes, x.shape[0], c, n, t)
    tg, dt = lay.tile_group, x.dtype
    xl = lay.to(x)
    gate = _pairs(lambda a: a.astype(dt), _bmm("GCK,GKN->GCN", *xl, wg, tg))
    up = _pairs(lambda a: a.astype(dt), _bmm("GCK,GKN->GCN", *xl, wu, tg))
    h = _pairs(lambda a, b: act(a) * b, gate, up)
    y = lay.back(*_bmm("GCI,GIH->GCH", *h, wo, tg)).astype(dt)
    return (y, lay.back(*gate), lay.back(*up)) if res else y


def _swiglu_bucket_bwd(c: int, n: int, t: int, act, x, wg, wu, wo, sizes, gate, up, dy):
    lay = _bucket_maps(sizes, x.shape[0], c, n, t)
    tg, dt = lay.tile_group, x.dtype
    xl, dyl, up = lay.to(x), lay.to(dy), lay.to(up)  # zero on padding rows
    a, act_vjp = zip(*(jax.vjp(act, g) if g is not None else (None, None) for g in lay.to(gate)))
    h = _pairs(lambda a, b: a * b, a, up)
    dh = _pairs(lambda a: a.astype(dt), _bmm("GCH,GIH->GCI", *dyl, wo, tg))
    dwo = _dw(lay, *h, *dyl)
    dgate = _pairs(lambda f, d, u: f(d * u)[0], act_vjp, dh, up)
    dup = _pairs(lambda d, a: d * a, dh, a)
    dwg = _dw(lay, *xl, *dgate)
    dx = _bmm("GCN,GKN->GCK", *dgate, wg, tg)
    dwu = _dw(lay, *xl, *dup)
    dx = _pairs(lambda a, b: a + b, dx, _bmm("GCN,GKN->GCK", *dup, wu, tg))
    return lay.back(*dx).astype(dt), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwo.astype(wo.dtype)


def _swiglu_unfused(impl: str, tile: int, act, x, wg, wu, wo, sizes):
    """The three grouped_matmul calls (every impl but `bucketed`; the fused path's fallback with `tiled`)."""
    gate = grouped_matmul(x, wg, sizes, impl=impl, tile=tile)
    up = grouped_matmul(x, wu, sizes, impl=impl, tile=tile)
    h = checkpoint_name(act(gate) * up, "moe_hidden")
    return grouped_matmul(h, wo, sizes, impl=impl, tile=tile)


def _swiglu_fallback_fwd(tile: int, act, res: bool, x, wg, wu, wo, sizes):
    gate, up = (_tiled(x, w, sizes, tile).astype(x.dtype) for w in (wg, wu))
    y = _tiled(act(gate) * up, wo, sizes, tile).astype(x.dtype)
    return (y, gate, up) if res else y


def _swiglu_fallback_bwd(tile: int, act, x, wg, wu, wo, sizes, gate, up, dy):
    del gate, up  # recomputed: the fallback is for rare, heavily skewed loads
    _, vjp = jax.vjp(lambda *w: _swiglu_unfused("tiled", tile, act, *w, sizes), x, wg, wu, wo)
    return vjp(dy)


def _swiglu_forward(res: bool, x, wg, wu, wo, sizes, act, branches, tile):
    """The forward switch: y, or (y, gate, up) when res (the residuals for the backward)."""
    fns = ([functools.partial(_swiglu_bucket_fwd, *b, act, res) for b in branches]
           + [functools.partial(_swiglu_fallback_fwd, tile, act, res)])
    return jax.lax.switch(bucket_branch(sizes, branches), fns, *_all_varying(x, wg, wu, wo, sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _swiglu_bucketed(x, wg, wu, wo, sizes, act, branches, tile):
    """The fused `bucketed` expert SwiGLU; sizes int32. Forward: one switch returning y; backward: a second
    switch on the same index (as in `_bucketed`), each branch regathering x, dy and (gate | up)."""
    return _swiglu_forward(False, x, wg, wu, wo, sizes, act, branches, tile)


def _swiglu_bucketed_fwd(x, wg, wu, wo, sizes, act, branches, tile):
    y, gate, up = _swiglu_forward(True, x, wg, wu, wo, sizes, act, branches, tile)
    return y, (x, wg, wu, wo, sizes, gate, up)


def _swiglu_bucketed_bwd(act, branches, tile, res, dy):
    x, wg, wu, wo, sizes, gate, up = res
    fns = ([functools.partial(_swiglu_bucket_bwd, *b, act) for b in branches]
           + [functools.partial(_swiglu_fallback_bwd, tile, act)])
    grads = jax.lax.switch(bucket_branch(sizes, branches), fns, *_all_varying(x, wg, wu, wo, sizes, gate, up, dy))
    return (*(_sum_to(d, p) for d, p in zip(grads, (x, wg, wu, wo))), None)


_swiglu_bucketed.defvjp(_swiglu_bucketed_fwd, _swiglu_bucketed_bwd)


def expert_swiglu(x: jax.Array, wg: jax.Array, wu: jax.Array, wo: jax.Array, group_sizes: jax.Array, *, act,
                  impl: str = "auto", tile: int = 0, fused: bool = True) -> jax.Array:
    """The routed experts' SwiGLU on rows sorted by expert: x [M, K], wg / wu [G, K, I], wo [G, I, K],
    group_sizes [G] -> act(x @ wg[g]) * (x @ wu[g]) @ wo[g] per group's rows, [M, K] in x's dtype (rows past
    sum(group_sizes) zero). `bucketed` (and `auto` off TPU) runs fused on one layout (see above) unless
    `fused=False`; the other impls are three `grouped_matmul` calls."""
    if impl == "auto":
        impl = "ragged_dot" if jax.default_backend() == "tpu" else "bucketed"
    if impl != "bucketed" or not fused:
        return _swiglu_unfused(impl, tile, act, x, wg, wu, wo, group_sizes)
    m, g = x.shape[0], wg.shape[0]
    return _swiglu_bucketed(x, wg, wu, wo, group_sizes.astype(jnp.int32), act, bucket_branches(m, g),
                            _fallback_tile(m, g, tile))
