"""Pallas TPU kernels of the quantized matmul: dense (`qmm_call`) and grouped over MoE experts (`qgmm_call`).

The weight streams from HBM as packed integer codes (`format`: P = 8 // bits codes per uint8, planar inside
each group of g rows) and is dequantized tile by tile in VMEM with shifts and masks: plane r of the codes
tile is `(byte >> (r * bits)) & mask`, a contiguous block of g / P rows of each group, so putting the planes
of a group one under the other gives its g rows in order (no lane shuffle).

A K-tile is a whole number of groups (8-bit codes, one per byte, may also cut a group into K-tiles). Per
tile, two ways to multiply (a static choice):
- weight-only (x bf16 / fp32): w = u * s + b per group (b = z asymmetric, -2^(bits-1) * s symmetric), the
  groups stacked into one [tk, tn] tile in x's dtype, one MXU dot with fp32 accumulation;
- int8 activations (W8A8 / W4A8 / W2A8): x arrives as int8 codes xq with a per-row scale xs (`ops` rounds it
  beside the kernel), x_hat = xs * xq. With centred weight codes q = u - 2^(bits-1) (int8 for every bits),
  w = u * s + z = q * s + z' where z' = z + 2^(bits-1) * s (asymmetric; symmetric: z' = 0), so per group j
      x_hat @ w (rows of group j) = xs * (s_j * (xq_j @ q_j) + z'_j * sum_{k in j} xq_k);
  xq_j @ q_j is an int8 dot accumulated exactly in int32, rescaled to fp32 per group; xs multiplies the
  finished row.

Scales (and zeros) come as the whole column stripe [K / g, tn] (a legal block for any K / g, fetched once per
output tile since its block index does not change with the K-tile); each group reads its row at a dynamic
offset.

`qgmm_call` runs the schedule of `pallas_kernels.gmm.kernel.make_schedule` (the same (group, m-tile) visits,
scalar-prefetched, rows of a tile outside the step's group masked at the store, rows outside the local
groups zeroed after the call); its weight blocks are those of the step's group.

M need not be a multiple of tm (rows are independent: padded rows of the last tile are clipped on store);
tk must divide K and tn must divide N (`ops` checks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.kernel import make_schedule, max_steps
from pallas_kernels.qmm.format import QuantizedTensor
from pallas_kernels.varying import out_struct


def unpack_groups(codes: jax.Array, *, bits: int, group_size: int) -> list[jax.Array]:
    """codes [tk * bits / 8, tn] uint8 (a whole number of groups) -> per group its unsigned codes [g, tn] int32."""
    c = codes.astype(jnp.int32)
    p = 8 // bits
    rows = group_size // p  # bytes per group
    if p == 1:
        return [c[j * rows:(j + 1) * rows] for j in range(c.shape[0] // rows)]
    mask = (1 << bits) - 1
    planes = [(c >> (r * bits)) & mask for r in range(p)]  # plane r, row j * rows + i: row r * rows + i of group j
    return [jnp.concatenate([plane[j * rows:(j + 1) * rows] for plane in planes], axis=0)
            for j in range(c.shape[0] // rows)]


def _group_rows(ref, row0, groups):
    """Rows row0 .. row0 + groups - 1 of a [K / g, tn] scales / zeros stripe, each [1, tn] fp32."""
    return [ref[pl.ds(row0 + j, 1), :] for j in range(groups)]


def _tile_product(x_ref, codes_ref, scales_ref, zeros_ref, kt, *, bits, group_size, int8, compute_dtype):
    """[tm, tn] fp32 contribution of one K-tile (without the per-row activation scale when int8)."""
    tk = codes_ref.shape[0] * 8 // bits
    g = min(group_size, tk)  # 8-bit codes (one per byte) may tile inside a group: then one partial group
    u = unpack_groups(codes_ref[...], bits=bits, group_size=g)
    # the K-tile's first group in the stripe (lax.div: jnp's floor division lowers through sign, not on Mosaic)
    row0 = kt * (tk // group_size) if tk >= group_size else lax.div(kt, group_size // tk)
    s = _group_rows(scales_ref, row0, len(u))
    mid = float(2 ** (bits - 1))
    if int8:
        zc = None if zeros_ref is None else [z + mid * sj for z, sj in
                                             zip(_group_rows(zeros_ref, row0, len(u)), s)]
        out = None
        for j, uj in enumerate(u):
            xj = x_ref[:, j * g:(j + 1) * g]  # [tm, g] int8
            q = (uj - (1 << (bits - 1))).astype(jnp.int8)  # centred codes, in [-128, 127] for every bits
            part = lax.dot_general(xj, q, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.int32).astype(jnp.float32) * s[j]
            if zc is not None:  # + z'_j * sum of the group's activation codes (exact in fp32: |sum| < 2^24)
                part = part + jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True) * zc[j]
            out = part if out is None else out + part
        return out
    b = [-mid * sj for sj in s] if zeros_ref is None else _group_rows(zeros_ref, row0, len(u))
    w = jnp.concatenate([(uj.astype(jnp.float32) * s[j] + b[j]).astype(compute_dtype) for j, uj in enumerate(u)],
                        axis=0)  # [tk, tn]
    return lax.dot_general(x_ref[...].astype(compute_dtype), w, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _split_refs(refs, *, asym, int8):
    """(x, codes, scales, zeros | None, xs | None, out, acc) from the kernel's refs."""
    refs = list(refs)
    x, codes, scales = refs[:3]
    rest = refs[3:]
    zeros = rest.pop(0) if asym else None
    xs = rest.pop(0) if int8 else None
    out, acc = rest
    return x, codes, scales, zeros, xs, out, acc


def _finish(acc_ref, xs_ref):
    return acc_ref[...] if xs_ref is None else acc_ref[...] * xs_ref[...]


def _qmm_kernel(*refs, tiles_k, asym, **tile_kw):
    x_ref, codes_ref, scales_ref, zeros_ref, xs_ref, out_ref, acc_ref = _split_refs(refs, asym=asym,
                                                                                    int8=tile_kw["int8"])
    kt = pl.program_id(2)

    @pl.when(kt == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _tile_product(x_ref, codes_ref, scales_ref, zeros_ref, kt, **tile_kw)

    @pl.when(kt == tiles_k - 1)
    def _store():
        out_ref[...] = _finish(acc_ref, xs_ref).astype(out_ref.dtype)


def _cost(m, k, n, qt_bytes, x, out_dtype, x_passes, w_passes):
    return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=(x.size * x.dtype.itemsize * x_passes + qt_bytes * w_passes
                                           + m * n * jnp.dtype(out_dtype).itemsize))


def qmm_call(x: jax.Array, xs: jax.Array | None, qt: QuantizedTensor, *, tiling: tuple[int, int, int],
             out_dtype, compute_dtype, interpret: bool) -> jax.Array:
    """x [M, K] (bf16 / fp32; int8 codes when xs [M, 1] fp32 is given) @ qt [K, N] -> [M, N] of out_dtype.
    tiling = (tm, tk, tn), already legal (ops checks)."""
    m, k = x.shape
    n = qt.shape[1]
    tm, tk, tn = tiling
    g, bits = qt.group_size, qt.bits
    kg = k // g
    tiles_m, tiles_n, tiles_k = pl.cdiv(m, tm), n // tn, k // tk
    int8, asym = xs is not None, not qt.symmetric

    in_specs = [pl.BlockSpec((tm, tk), lambda i, j, kt: (i, kt)),
                pl.BlockSpec((tk * bits // 8, tn), lambda i, j, kt: (kt, j)),
                pl.BlockSpec((kg, tn), lambda i, j, kt: (0, j))]  # the whole stripe of scales
    operands = [x, qt.codes, qt.scales]
    if asym:
        in_specs.append(pl.BlockSpec((kg, tn), lambda i, j, kt: (0, j)))
        operands.append(qt.zeros)
    if int8:
        in_specs.append(pl.BlockSpec((tm, 1), lambda i, j, kt: (i, 0)))
        operands.append(xs)
    kernel = functools.partial(_qmm_kernel, tiles_k=tiles_k, asym=asym, bits=bits, group_size=g, int8=int8,
                               compute_dtype=compute_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, *operands),
        grid=(tiles_m, tiles_n, tiles_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kt: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(m, k, n, qt.nbytes, x, out_dtype, tiles_n, tiles_m),
        interpret=interpret,
        name="qmm",
    )(*operands)


def _qgmm_kernel(step_group, step_tile, group_start, group_end,  # scalar prefetch (SMEM)
                 *refs, tm, tiles_k, asym, **tile_kw):
    x_ref, codes_ref, scales_ref, zeros_ref, xs_ref, out_ref, acc_ref = _split_refs(refs, asym=asym,
                                                                                    int8=tile_kw["int8"])
    step, kt = pl.program_id(1), pl.program_id(2)

    @pl.when(kt == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _tile_product(x_ref, codes_ref, scales_ref, zeros_ref, kt, **tile_kw)

    @pl.when(kt == tiles_k - 1)
    def _store():  # only the rows of the step's group (a straddling tile is stored by each of its groups)
        grp = step_group[step]
        rows = step_tile[step] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mask = (rows >= group_start[grp]) & (rows < group_end[grp])
        out_ref[...] = jnp.where(mask, _finish(acc_ref, xs_ref).astype(out_ref.dtype), out_ref[...])


def qgmm_call(x: jax.Array, xs: jax.Array | None, qts: QuantizedTensor, group_sizes: jax.Array,
              group_offset: jax.Array, *, tiling: tuple[int, int, int], out_dtype, compute_dtype,
              interpret: bool) -> jax.Array:
    """Per local group j (group group_offset + j of group_sizes [G]): rows of x [M, K] in it @ qts[j] -> [M, N].

    qts: QuantizedTensor with a leading group axis (codes [GL, K * bits / 8, N], scales / zeros [GL, K / g, N]).
    xs [M, 1] as in `qmm_call`. Rows outside the local groups are zero."""
    m, k = x.shape
    gl = qts.codes.shape[0]
    n = qts.shape[1]
    if m == 0:
        return jnp.zeros((m, n), out_dtype)
    tm, tk, tn = tiling
    g, bits = qts.group_size, qts.bits
    kg = k // g
    tiles_n, tiles_k = n // tn, k // tk
    int8, asym = xs is not None, not qts.symmetric
    sched = make_schedule(group_sizes, group_offset, m=m, tm=tm, num_local_groups=gl, visit_empty_groups=False)

    # Index maps get the grid indices, then the scalar-prefetch refs.
    def x_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_tile[step], kt

    def codes_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_group[step], kt, nt

    def stripe_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_group[step], 0, nt

    def row_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_tile[step], 0

    def out_map(nt, step, kt, step_group, step_tile, gs, ge):
        return step_tile[step], nt

    in_specs = [pl.BlockSpec((tm, tk), x_map), pl.BlockSpec((None, tk * bits // 8, tn), codes_map),
                pl.BlockSpec((None, kg, tn), stripe_map)]
    operands = [x, qts.codes, qts.scales]
    if asym:
        in_specs.append(pl.BlockSpec((None, kg, tn), stripe_map))
        operands.append(qts.zeros)
    if int8:
        in_specs.append(pl.BlockSpec((tm, 1), row_map))
        operands.append(xs)
    kernel = functools.partial(_qgmm_kernel, tm=tm, tiles_k=tiles_k, asym=asym, bits=bits, group_size=g,
                               int8=int8, compute_dtype=compute_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, *operands, *sched),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, sched.num_steps, tiles_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # n-tiles are independent; steps revisit output blocks and k accumulates.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(m, k, n, qts.nbytes // gl, x, out_dtype, tiles_n, max_steps(m, tm, gl)),
        interpret=interpret,
        name="qgmm",
    )(sched.step_group, sched.step_tile, sched.group_start, sched.group_end, *operands)
    rows = lax.broadcasted_iota(jnp.int32, (m, 1), 0)
    local = (rows >= sched.group_start[0]) & (rows < sched.group_end[-1])
    return jnp.where(local, out, jnp.zeros((), out_dtype))
