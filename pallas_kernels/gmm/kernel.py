"""Pallas TPU kernels of the grouped matmul: `gmm` (forward and input gradient) and `tgmm` (weight gradient).

Rows of the row-major operand are sorted by group: group g owns rows [start_g, end_g) with
end_g = start_g + group_sizes[g]. Under expert parallelism a shard holds only the weights of
`num_local_groups` consecutive groups starting at `group_offset` (in `group_sizes`' numbering); it visits
only their rows, and the other rows of its `gmm` output are zero.

Schedule (`make_schedule`). The row dimension is cut into m-tiles of `tm` rows. A group covers the m-tiles
from the one holding its first row to the one holding its last; a tile that straddles a group boundary is
visited once per group it holds rows of. One grid step = one (group, m-tile) visit; the steps are ordered by
group, then tile, so the visits of one output tile are consecutive (Pallas keeps an output block resident
while its block index does not change, which is what lets a straddling tile be written in two visits). The
step -> (group, tile) tables and the group bounds go to SMEM by scalar prefetch
(`pltpu.PrefetchScalarGridSpec`) and drive the BlockSpec index maps. The number of steps is data
dependent, at most `tiles_m + num_local_groups - 1`; it is passed as the (dynamic) grid extent, so a shard
runs only the steps of its own groups.

`gmm` grid: (n-tiles, steps, k-tiles). The fp32 accumulator lives in VMEM scratch; at the last k-tile the
rows of the step's group are stored (a row mask; the block's other rows keep the buffer's contents and are
written by the visit of the neighbouring group, just before or after). Rows outside the local groups
(another shard's groups, rows past sum(group_sizes)) are never stored by the kernel and are zeroed by the
caller (`gmm_call` does it, one select that XLA fuses into the consumer).

`tgmm` grid: (k-tiles, n-tiles, steps). For each output block [group, tk, tn] the steps of one group
accumulate lhs_tile^T @ rhs_tile over its m-tiles (rows of other groups masked to zero), zeroing the
accumulator at the group's first step and storing at its last. Empty local groups get one step that
stores zeros, so every block of the [num_local_groups, K, N] output is written.

Edges: M, K and N need not be multiples of the tiles. Pallas pads edge blocks (garbage / NaN on reads, writes
clipped): rows past M are past every group end and are masked; columns past N are clipped on store; a
partial k-tile is masked on both operands (where, not multiply, so padded NaNs cannot leak).

Compared with jax's megablox (same idea): the schedule holds only the local groups (no roll of a global
table), M need not be a multiple of tm, tgmm reads its lhs row-major ([M, K], no transposed copy), and the
rows a shard does not own always come out zero.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.varying import out_struct


class Schedule(NamedTuple):
    """Grid-step tables of one grouped matmul (all int32; S = max_steps(...))."""

    step_group: jax.Array  # [S] local group (0 .. num_local_groups-1) of each step
    step_tile: jax.Array  # [S] m-tile of each step
    group_start: jax.Array  # [num_local_groups] first row of each local group
    group_end: jax.Array  # [num_local_groups] one past its last row
    num_steps: jax.Array  # [] steps actually run (the grid extent); steps past it repeat the last one


def max_steps(m: int, tm: int, num_local_groups: int) -> int:
    """Static bound on the steps: the non-empty groups cover disjoint row ranges, so together they touch
    at most tiles_m tiles plus one shared boundary tile per further group; an empty group visited alone
    costs one step, no more than the boundary it does not have."""
    return pl.cdiv(m, tm) + num_local_groups - 1


def make_schedule(group_sizes: jax.Array, group_offset: jax.Array, *, m: int, tm: int, num_local_groups: int,
                  visit_empty_groups: bool) -> Schedule:
    """Steps of the groups [group_offset, group_offset + num_local_groups) of `group_sizes` ([G] int32) over
    m rows in m-tiles of tm. group_offset: [] int32 (traced; under shard_map the shard's first group).

    Row bounds are clipped to m, so sum(group_sizes) > m cannot make a kernel touch rows past M. With
    visit_empty_groups (tgmm), an empty group gets one step (at the tile where it would start, clamped)."""
    tiles_m = pl.cdiv(m, tm)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    start = lax.dynamic_slice_in_dim(starts, group_offset, num_local_groups)
    end = lax.dynamic_slice_in_dim(ends, group_offset, num_local_groups)

    first_tile = start // tm
    tiles = jnp.where(end > start, pl.cdiv(end, tm) - first_tile, 1 if visit_empty_groups else 0)
    last_step = jnp.cumsum(tiles)  # one past the last step of each group
    num_steps = last_step[-1]

    s = max_steps(m, tm, num_local_groups)
    step = jnp.minimum(jnp.arange(s, dtype=jnp.int32), jnp.maximum(num_steps - 1, 0))
    group = jnp.minimum(jnp.searchsorted(last_step, step, side="right"), num_local_groups - 1).astype(jnp.int32)
    tile = first_tile[group] + step - (last_step[group] - tiles[group])
    tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
    return Schedule(group, tile, start.astype(jnp.int32), end.astype(jnp.int32), num_steps.astype(jnp.int32))


def _row_mask(shape, tile, start, end, tm):
    """[tm, x] bool: rows of m-tile `tile` that lie in [start, end)."""
    rows = tile * tm + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _gmm_kernel(step_group, step_tile, group_start, group_end,  # scalar prefetch (SMEM)
                lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tk, k, tiles_k, transpose_rhs, compute_dtype):
    step, kt = pl.program_id(1), pl.program_id(2)

    @pl.when(kt == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, w = lhs_ref[...], rhs_ref[...]  # [tm, tk], [tk, tn] (or [tn, tk] with transpose_rhs)
    if k % tk:  # ragged last k-tile: zero the padded columns of x and rows of w (static check)
        valid = k - kt * tk
        x = jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 1) < valid, x, 0)
        w = jnp.where(lax.broadcasted_iota(jnp.int32, w.shape, 1 if transpose_rhs else 0) < valid, w, 0)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(x.astype(compute_dtype), w.astype(compute_dtype), dims,
                                    preferred_element_type=jnp.float32)

    @pl.when(kt == tiles_k - 1)
    def _store():
        g = step_group[step]
        mask = _row_mask(acc_ref.shape, step_tile[step], group_start[g], group_end[g], tm)
        out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm_call(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
             tiling: tuple[int, int, int], out_dtype, transpose_rhs: bool, compute_dtype,
             interpret: bool) -> jax.Array:
    """lhs [M, K] @ rhs [GL, K, N] ([GL, N, K] with transpose_rhs) per group -> [M, N] of out_dtype.

    rhs[j] is group group_offset + j of group_sizes ([G] int32, G >= GL). Rows outside the local groups
    are zero. tiling = (tm, tk, tn), already legal for the target (see ops.choose_tiling)."""
    m, k = lhs.shape
    gl = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or k == 0 or n == 0:  # nothing to tile (k == 0: an empty sum)
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = tiling
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    sched = make_schedule(group_sizes, group_offset, m=m, tm=tm, num_local_groups=gl, visit_empty_groups=False)

    # Index maps get the grid indices, then the scalar-prefetch refs.
    def lhs_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_tile[step], kt

    def rhs_map(nt, step, kt, step_group, step_tile, gs, ge):
        return (step_group[step], nt, kt) if transpose_rhs else (step_group[step], kt, nt)

    def out_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_tile[step], nt

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, k=k, tiles_k=tiles_k, transpose_rhs=transpose_rhs,
                               compute_dtype=compute_dtype)
    # For XLA's scheduler: lhs is streamed once per n-tile, a group's weights once per step (an upper bound:
    # consecutive steps of one group re-fetch them only when the k/n block changes).
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=(lhs.size * lhs.dtype.itemsize * tiles_n + k * n * rhs.dtype.itemsize * max_steps(m, tm, gl)
                        + m * n * jnp.dtype(out_dtype).itemsize))
    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs, rhs, *sched),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, sched.num_steps, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # n-tiles are independent (megacore may split them); steps revisit output blocks and k accumulates.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="gmm",
    )(sched.step_group, sched.step_tile, sched.group_start, sched.group_end, lhs, rhs)
    # Rows the kernel never stored (other shards' groups, rows past sum(group_sizes), untouched tiles).
    rows = lax.broadcasted_iota(jnp.int32, (m, 1), 0)
    local = (rows >= sched.group_start[0]) & (rows < sched.group_end[-1])
    return jnp.where(local, out, jnp.zeros((), out_dtype))


def _tgmm_kernel(step_group, step_tile, group_start, group_end,  # scalar prefetch (SMEM)
                 x_ref, y_ref, out_ref, acc_ref, *, tm, compute_dtype):
    step, last = pl.program_id(2), pl.num_programs(2) - 1
    g = step_group[step]
    first_of_group = (step == 0) | (step_group[jnp.maximum(step - 1, 0)] != g)
    last_of_group = (step == last) | (step_group[jnp.minimum(step + 1, last)] != g)
    start, end = group_start[g], group_end[g]

    @pl.when(first_of_group)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end > start)
    def _accumulate():
        tile = step_tile[step]
        x = jnp.where(_row_mask(x_ref.shape, tile, start, end, tm), x_ref[...], 0)  # [tm, tk]
        y = jnp.where(_row_mask(y_ref.shape, tile, start, end, tm), y_ref[...], 0)  # [tm, tn]
        acc_ref[...] += lax.dot_general(x.astype(compute_dtype), y.astype(compute_dtype),
                                        (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(last_of_group)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_call(x: jax.Array, y: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
              num_local_groups: int, tiling: tuple[int, int, int], out_dtype, compute_dtype,
              interpret: bool) -> jax.Array:
    """Per local group j (group group_offset + j): x[rows]^T @ y[rows]; x [M, K], y [M, N] -> [GL, K, N].

    Both operands are row-major in M (the layout the forward's lhs and the output gradient already have),
    so no transpose is materialised. Empty groups give zero blocks. tiling = (tm, tk, tn)."""
    m, k = x.shape
    n = y.shape[1]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_local_groups, k, n), out_dtype)
    tm, tk, tn = tiling
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    sched = make_schedule(group_sizes, group_offset, m=m, tm=tm, num_local_groups=num_local_groups,
                          visit_empty_groups=True)

    def x_map(kt, nt, step, step_group, step_tile, gs, ge):
        return step_tile[step], kt

    def y_map(kt, nt, step, step_group, step_tile, gs, ge):
        return step_tile[step], nt

    def out_map(kt, nt, step, step_group, step_tile, gs, ge):
        return step_group[step], kt, nt

    kernel = functools.partial(_tgmm_kernel, tm=tm, compute_dtype=compute_dtype)
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=(x.size * x.dtype.itemsize * tiles_n + y.size * y.dtype.itemsize * tiles_k
                        + num_local_groups * k * n * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((num_local_groups, k, n), out_dtype, x, y, *sched),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_k, tiles_n, sched.num_steps),
            in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec((tm, tn), y_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="tgmm",
    )(sched.step_group, sched.step_tile, sched.group_start, sched.group_end, x, y)
