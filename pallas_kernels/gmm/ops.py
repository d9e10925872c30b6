"""The differentiable grouped matmul (`gmm`, a `jax.custom_vjp` over the Pallas kernels), the weight-gradient
kernel as a function (`tgmm`) and the tiling heuristic (`choose_tiling`).

Gradients of out = gmm(lhs, rhs): d lhs = gmm(d out, rhs^T) (the same kernel with the other rhs layout) and
d rhs[j] = lhs[rows of group j]^T @ d out[rows of group j] (`tgmm`). Both run over the same groups as the
forward, so with `group_offset` a shard's backward also touches only its own groups' rows.

Precision: operands enter the MXU in bf16 when lhs and rhs are both bf16, else in fp32; the accumulator is
always fp32. The backward runs in the forward's operand precision: for bf16 inputs the output cotangent is
cast to bf16 first (lossless where the output is itself cast back to bf16, as in the MoE layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gmm import kernel
from pallas_kernels.target import on_target

Tiles = tuple[int, int, int]
TilingFn = Callable[[int, int, int], Tiles]
Tiling = Union[Tiles, TilingFn, None]

_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
SUBLANE, LANE = 8, 128  # TPU block-shape rule: the last two block dims are multiples of (8, 128) or full
VMEM_BUDGET = 12 * 2**20  # per kernel; under the 16 MiB default scoped VMEM of v4 / v5 (v6e has 32 MiB)


def _pow2_floor(x: float) -> int:
    return 2 ** max(0, math.floor(math.log2(max(1.0, x))))


def _lane_tile(dim: int, cap: int) -> int:
    """A tile along a lane-mapped dim (K or N): the whole dim if it fits under cap, else the largest multiple
    of 256 (the v6e MXU width), then of 128, that is <= cap and divides dim (no ragged tail), else cap itself
    rounded to 128 (a masked / clipped ragged tail)."""
    if dim <= cap:
        return dim
    for align in (2 * LANE, LANE):
        for t in range(cap // align * align, 0, -align):
            if dim % t == 0:
                return t
    return max(LANE, cap // LANE * LANE)


def vmem_bytes(tiles: Tiles, in_bytes: int, out_bytes: int) -> int:
    """VMEM of the worst of the three kernels of one gmm with these (tm, tk, tn): double-buffered input
    blocks, double-buffered output block, fp32 accumulator."""
    tm, tk, tn = tiles
    fwd = 2 * (tm * tk + tk * tn) * in_bytes + 2 * tm * tn * out_bytes + 4 * tm * tn  # also dlhs, k <-> n
    dlhs = 2 * (tm * tn + tn * tk) * in_bytes + 2 * tm * tk * in_bytes + 4 * tm * tk
    wgrad = 2 * tm * (tk + tn) * in_bytes + 2 * tk * tn * in_bytes + 4 * tk * tn
    return max(fwd, dlhs, wgrad)


def choose_tiling(m: int, k: int, n: int, *, num_groups: int, dtype=jnp.float32, out_dtype=jnp.float32,
                  interpret: bool = False) -> Tiles:
    """(tm, tk, tn) for lhs [m, k], rhs [num_groups, k, n]: tiles along M, K and N.

    tm follows the average group size (a group boundary wastes up to one tile of rows, so tiles much larger
    than a group mostly compute masked rows), as a power of two in [128, 512] on TPU: smaller tiles starve
    the MXU and pay Pallas' fixed per-grid-step overhead more often. tk and tn are multiples of 128 that
    divide K and N where possible, up to 1024, then halved (the larger first) until the blocks of all three
    kernels fit VMEM_BUDGET. A tile never exceeds its dim (a whole dim is always a legal block).

    Interpret mode (CPU) costs a fixed time per grid step whatever the block size, so there tk = K, tn = N
    and tm is the average group size rounded up, in [8, 1024]: about two steps per group."""
    g = max(1, num_groups)
    m, k, n = max(1, m), max(1, k), max(1, n)  # (empty operands are not tiled; keep the tiles positive)
    if interpret:
        tm = min(1024, max(8, 2 ** math.ceil(math.log2(max(1, -(-m // g))))))
        return (min(tm, m), k, n)
    tm = min(512, max(128, _pow2_floor(m / g)))
    tm = m if m <= tm else tm
    in_b, out_b = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    cap_k = cap_n = 1024
    tk, tn = _lane_tile(k, cap_k), _lane_tile(n, cap_n)
    while vmem_bytes((tm, tk, tn), in_b, out_b) > VMEM_BUDGET and max(tk, tn) > LANE:
        if tk >= tn:
            cap_k = max(LANE, min(cap_k, tk) // 2)
            tk = _lane_tile(k, cap_k)
        else:
            cap_n = max(LANE, min(cap_n, tn) // 2)
            tn = _lane_tile(n, cap_n)
    return (tm, tk, tn)


def _legal(tiles: Tiles, dims: tuple[int, int, int], interpret: bool, what: str) -> Tiles:
    """Clamp a kernel's (t_rows, t_contract_or_k, t_cols) to its dims and check the TPU block rules."""
    tiles = tuple(int(min(t, max(d, 1))) for t, d in zip(tiles, dims))
    if any(t < 1 for t in tiles):
        raise ValueError(f"{what}: tiles must be positive, got {tiles}")
    if not interpret and 0 not in dims:  # an empty operand runs no kernel (kernel.gmm_call returns zeros)
        (tm, ta, tb), (m, a, b) = tiles, dims
        bad = []
        if tm % SUBLANE and tm != m:
            bad.append(f"tm={tm} (a multiple of {SUBLANE} or all {m} rows)")
        for t, d in ((ta, a), (tb, b)):
            if t % LANE and t != d:
                bad.append(f"{t} (a multiple of {LANE} or the whole dim {d})")
        if bad:
            raise ValueError(f"{what}: tiling {tiles} for dims {dims} is not a legal TPU block: {', '.join(bad)}")
    return tiles


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one gmm call for one target (hashable: part of the custom_vjp's
    non-differentiable arg)."""

    tiles: Tiles  # (tm, tk, tn) along the problem's M, K, N
    out_dtype: np.dtype
    compute_dtype: np.dtype
    transpose_rhs: bool
    interpret: bool

    def fwd(self, m, k, n):
        return _legal(self.tiles, (m, k, n), self.interpret, "gmm")

    def dlhs(self, m, k, n):  # gmm(d out [M, N], rhs^T): contracts N, produces K columns
        tm, tk, tn = self.tiles
        return _legal((tm, tn, tk), (m, n, k), self.interpret, "gmm backward (d lhs)")

    def drhs(self, m, k, n):  # tgmm(lhs, d out) -> [GL, K, N], or (d out, lhs) -> [GL, N, K] when transposed
        tm, tk, tn = self.tiles
        if self.transpose_rhs:
            return _legal((tm, tn, tk), (m, n, k), self.interpret, "gmm backward (d rhs)")
        return _legal((tm, tk, tn), (m, k, n), self.interpret, "gmm backward (d rhs)")


@dataclasses.dataclass(frozen=True)
class _Plans:
    """The plan of each target the call may lower to: one, or both when interpret=None (chosen when lowering)."""

    mosaic: _Plan | None
    interpreter: _Plan | None

    @property
    def interpret(self) -> bool | None:
        if self.mosaic is not None and self.interpreter is not None:
            return None
        return self.mosaic is None

    def run(self, fn, *args):
        """fn(plan, *args) with the plan of the target lowered for (`pallas_kernels.target.on_target`)."""
        def with_plan(*a, interpret: bool):
            return fn(self.interpreter if interpret else self.mosaic, *a)

        return on_target(self.interpret, with_plan, *args)


def _dims(lhs, rhs, transpose_rhs):
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return m, k, n


def _forward(plan: _Plan, lhs, rhs, group_sizes, group_offset):
    return kernel.gmm_call(lhs, rhs, group_sizes, group_offset, tiling=plan.fwd(*_dims(lhs, rhs, plan.transpose_rhs)),
                           out_dtype=plan.out_dtype, transpose_rhs=plan.transpose_rhs,
                           compute_dtype=plan.compute_dtype, interpret=plan.interpret)


def _backward(plan: _Plan, lhs, rhs, group_sizes, group_offset, d_out):
    m, k, n = _dims(lhs, rhs, plan.transpose_rhs)
    g = d_out.astype(plan.compute_dtype)
    d_lhs = kernel.gmm_call(g, rhs, group_sizes, group_offset, tiling=plan.dlhs(m, k, n), out_dtype=lhs.dtype,
                            transpose_rhs=not plan.transpose_rhs, compute_dtype=plan.compute_dtype,
                            interpret=plan.interpret)
    x, y = (g, lhs) if plan.transpose_rhs else (lhs, g)  # d rhs in rhs's own layout, no transpose after
    d_rhs = kernel.tgmm_call(x, y, group_sizes, group_offset, num_local_groups=rhs.shape[0],
                             tiling=plan.drhs(m, k, n), out_dtype=rhs.dtype, compute_dtype=plan.compute_dtype,
                             interpret=plan.interpret)
    return d_lhs, d_rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, plans: _Plans):
    return plans.run(_forward, lhs, rhs, group_sizes, group_offset)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, plans: _Plans):
    return plans.run(_forward, lhs, rhs, group_sizes, group_offset), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(plans: _Plans, res, d_out):
    d_lhs, d_rhs = plans.run(_backward, *res, d_out)
    return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check_operands(lhs, rhs, group_sizes, rhs_ndim: int, what: str):
    if lhs.ndim != 2 or rhs.ndim != rhs_ndim or group_sizes.ndim != 1:
        raise ValueError(f"{what}: expected lhs 2-D, the second operand {rhs_ndim}-D and group_sizes 1-D, got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    for name, a in (("lhs", lhs), ("second operand", rhs)):
        if jnp.dtype(a.dtype) not in _SUPPORTED:
            raise ValueError(f"{what}: {name} must be float32 or bfloat16, got {a.dtype}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{what}: group_sizes must be integer, got {group_sizes.dtype}")


def _compute_dtype(a, b):
    bf16 = jnp.dtype(jnp.bfloat16)
    return bf16 if jnp.dtype(a.dtype) == bf16 and jnp.dtype(b.dtype) == bf16 else jnp.dtype(jnp.float32)


def _offset(group_offset) -> jax.Array:
    off = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    if off.size != 1:
        raise ValueError(f"group_offset must be a scalar, got shape {off.shape}")
    return off.reshape(())


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _vary_like(operands, others, *, interpret: bool | None):
    """Inside a `jax.shard_map` (checked varying axes), make the differentiable operands vary over every mesh
    axis any of operands + others varies over, as jax does implicitly for its own ops: the custom_vjp's
    cotangents then have the operands' types, and the transpose of this cast sums d lhs over the shards
    when lhs was replicated (e.g. tokens shared by all expert shards). A no-op outside shard_map.

    interpret=True fails here with a clear error; with interpret=None the target is not known yet, so a
    lowering for the interpreter fails later, in jax's own varying-axes check."""
    axes = frozenset().union(*(_varying_axes(x) for x in (*operands, *others)))
    if not axes or not hasattr(jax.lax, "pcast"):
        return operands
    if interpret:
        raise NotImplementedError(
            "gmm in Pallas interpret mode cannot run inside a jax.shard_map that checks varying manual axes "
            "(check_vma=True, the default): jax's interpreter indexes the varying schedule tables with "
            "non-varying grid indices and fails. Use jax.shard_map(..., check_vma=False) off TPU, or another "
            "grouped-matmul implementation there; the TPU kernel itself is fine with check_vma=True.")
    out = []
    for x in operands:
        missing = tuple(sorted(axes - _varying_axes(x)))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(out)


def _given_tiles(tiling: Tiling, m, k, n) -> Tiles | None:
    """The tiles that `tiling` gives (None when it is None: `choose_tiling` per target)."""
    if tiling is None:
        return None
    tiles = tiling(m, k, n) if callable(tiling) else tiling
    if tiles is None or len(tiles) != 3:
        raise ValueError(f"tiling must give (tm, tk, tn), got {tiles!r}")
    return tuple(int(t) for t in tiles)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = None,
        preferred_element_type=None, group_offset: int | jax.Array | None = None, transpose_rhs: bool = False,
        interpret: bool | None = None) -> jax.Array:
    """Grouped matmul: out[rows of group g] = lhs[rows of group g] @ rhs[g - group_offset]; differentiable.

    lhs: [M, K], rows sorted by group (group g owns the group_sizes[g] rows after those of groups < g).
    rhs: [GL, K, N] ([GL, N, K] with transpose_rhs): the weights of the GL local groups
        group_offset .. group_offset + GL - 1 (GL = G without expert parallelism).
    group_sizes: [G] int, G >= GL; sum(group_sizes) <= M.
    tiling: (tm, tk, tn) tiles along M, K and N (clamped to the dims; the backward kernels use the same
        tiles along the same dims), a function (m, k, n) -> (tm, tk, tn), or None for `choose_tiling`.
    preferred_element_type: output dtype (default lhs.dtype); accumulation is fp32 either way.
    group_offset: first local group (int or traced scalar, e.g. from `jax.lax.axis_index` under shard_map).
    interpret: True runs the Pallas interpreter, False the Mosaic TPU kernel, None chooses by the platform
        being lowered for (the Mosaic kernel for TPU, also in an AOT compile from a CPU host); user tiles
        must then be legal TPU blocks.

    Returns [M, N]; rows of non-local groups and rows past sum(group_sizes) are zero. Gradients flow to lhs
    and rhs (`jax.grad` / `jax.vjp`), not to group_sizes / group_offset.

    Under `jax.shard_map` the compiled TPU kernel works with the varying-axes check on; interpret mode needs
    `check_vma=False` there (jax 0.10's Pallas interpreter fails the check: with interpret=True a clear error
    says so at trace time, with interpret=None jax's check fails when lowering for the interpreter)."""
    _check_operands(lhs, rhs, group_sizes, 3, "gmm")
    m, k, n = _dims(lhs, rhs, transpose_rhs)
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if k_rhs != k:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape}, rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs})")
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"gmm: rhs has {rhs.shape[0]} groups but group_sizes only {group_sizes.shape[0]}")
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    cd = _compute_dtype(lhs, rhs)
    given = _given_tiles(tiling, m, k, n)

    def plan(target: bool) -> _Plan | None:
        if interpret is not None and bool(interpret) != target:
            return None
        tiles = given or choose_tiling(m, k, n, num_groups=rhs.shape[0], dtype=cd, out_dtype=out_dtype,
                                       interpret=target)
        p = _Plan(tiles, out_dtype, cd, bool(transpose_rhs), target)
        p.fwd(m, k, n), p.dlhs(m, k, n), p.drhs(m, k, n)  # fail here, not inside a trace of the backward
        return p

    plans = _Plans(mosaic=plan(False), interpreter=plan(True))
    group_sizes, group_offset = group_sizes.astype(jnp.int32), _offset(group_offset)
    lhs, rhs = _vary_like((lhs, rhs), (group_sizes, group_offset), interpret=interpret)
    return _gmm(lhs, rhs, group_sizes, group_offset, plans)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tiling: Tiling = None,
         preferred_element_type=jnp.float32, group_offset: int | jax.Array | None = None,
         num_local_groups: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Per-group transposed matmul (the weight gradient of `gmm`): out[j] = lhs[:, rows of g] @ grad[rows of g]
    for g = group_offset + j, j < num_local_groups (default: all G groups).

    lhs: [K, M] (as in megablox; the kernel reads it as [M, K], so pass `x.T` of a row-major x: the
    double transpose cancels under jit), grad: [M, N], group_sizes [G] int. Returns [GL, K, N] of
    preferred_element_type; empty groups give zeros. tiling: (tm, tk, tn) along M, K, N. interpret: as in
    `gmm`. Not differentiable (use `gmm` for that)."""
    _check_operands(lhs, grad, group_sizes, 2, "tgmm")
    k, m = lhs.shape
    if grad.shape[0] != m:
        raise ValueError(f"tgmm: lhs {lhs.shape} is [K, M] and grad {grad.shape} must be [M, N]")
    gl = group_sizes.shape[0] if num_local_groups is None else int(num_local_groups)
    if not 1 <= gl <= group_sizes.shape[0]:
        raise ValueError(f"tgmm: num_local_groups={gl} must be in [1, {group_sizes.shape[0]}]")
    n = grad.shape[1]
    cd = _compute_dtype(lhs, grad)
    out_dtype = jnp.dtype(preferred_element_type)
    given = _given_tiles(tiling, m, k, n)
    targets = (False, True) if interpret is None else (bool(interpret),)
    tiles = {t: _legal(given or choose_tiling(m, k, n, num_groups=gl, dtype=cd, out_dtype=out_dtype, interpret=t),
                       (m, k, n), t, "tgmm") for t in targets}  # every target's, checked before tracing

    def run(x, y, sizes, offset, *, interpret: bool):
        return kernel.tgmm_call(x, y, sizes, offset, num_local_groups=gl, tiling=tiles[interpret],
                                out_dtype=out_dtype, compute_dtype=cd, interpret=interpret)

    return on_target(interpret, run, lhs.T, grad, group_sizes.astype(jnp.int32), _offset(group_offset))
