"""FlashMask Pallas TPU kernels: forward, and backward as two kernels (dk/dv over kv tiles, dq over q tiles).

Layout inside the kernels: q / o / do [B, Hq, Sq_p, D], k / v [B, Hkv, Sk_p, D] (sequence padded to the
block sizes). The mask is the canonical 4-row form of `startend_row_indices` (see ops.py): for key column j,
rows LTS[j] <= i < LTE[j] are masked in the lower-left triangle (i >= j) and rows UTS[j] <= i < UTE[j] in
the upper-right one (i < j); `causal=True` masks the whole upper-right triangle statically.

Tile skipping (scalar prefetch, SMEM):
* `stats` [B*Hm*nk*8] int32: per kv tile, min and max of each of the 4 bounds over its columns. From them
  and the tile's row range, `classify` decides statically-shaped, per grid step: the tile is *computed*
  (some entry may be unmasked; otherwise it is skipped entirely) and *full* (no entry is masked: the mask
  arithmetic is skipped too).
* `ranges`: per q tile (forward, dq) the first / last computed kv tile, per kv tile (dk/dv) the first /
  last computed q tile. Index maps clamp the streamed tile index into that range, so a skipped tile
  outside it repeats the previous block index and Pallas issues no DMA for it.

Softmax in fp32 with the running max / sum (online softmax); entries masked in a partial tile get
probability exactly 0, so a query row without any visible key ends with l = 0: its output is 0 and its
log-sum-exp is +inf, which makes its backward probabilities exp(s - inf) = 0 (zero gradients, no NaN).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.varying import out_struct

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NUM_LANES = 128
NUM_STATS = 8  # min/max of LTS, LTE, UTS, UTE


def classify(r0, r1, c0, c1, st, causal: bool):
    """Tile classification from the bounds' min/max; works on scalars (in the kernel) and arrays (ops.py).

    r0..r1: the tile's real query rows (inclusive); c0..c1: its key columns (inclusive).
    st: (minLTS, maxLTS, minLTE, maxLTE, minUTS, maxUTS, minUTE, maxUTE) over the tile's columns.
    Returns (computed, full): computed is False only if every entry is masked (conservative: never False
    for a tile with a visible entry); full is True only if no entry is masked (also conservative).
    """
    min_lts, max_lts, min_lte, max_lte, min_uts, max_uts, min_ute, max_ute = st
    # Lower-left part: entries i >= j; column j owns rows max(r0, j)..r1.
    ll_none = r1 < c0
    ll_lo = jnp.maximum(r0, c0)
    ll_masked = ll_none | ((max_lts <= ll_lo) & (min_lte > r1))
    ll_clear = ll_none | (min_lts > r1) | (max_lte <= ll_lo)
    # Upper-right part: entries i < j; column j owns rows r0..min(r1, j - 1).
    ur_none = r0 >= c1
    ur_hi = jnp.minimum(r1, c1 - 1)
    if causal:
        ur_masked = jnp.ones_like(ur_none)
        ur_clear = ur_none
    else:
        ur_masked = ur_none | ((max_uts <= r0) & (min_ute > ur_hi))
        ur_clear = ur_none | (min_uts > ur_hi) | (max_ute <= r0)
    return ~(ll_masked & ur_masked), ll_clear & ur_clear


def _visible(i, j, lts, lte, uts, ute, causal: bool):
    """Elementwise: True where query row i may attend key column j (bounds broadcast against i, j)."""
    vis_ll = (i < lts) | (i >= lte)
    if causal:
        return (i >= j) & vis_ll
    return jnp.where(i >= j, vis_ll, (i < uts) | (i >= ute))


def _dot_nt(a, b):
    """a [m, d] x b [n, d] -> [m, n] fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tile_stats(stats_ref, b, hm, ki, *, hm_count, nk):
    base = ((b * hm_count + hm) * nk + ki) * NUM_STATS
    return tuple(stats_ref[base + t] for t in range(NUM_STATS))


def _clamp_range(ranges_ref, row, x):
    return jnp.minimum(jnp.maximum(x, ranges_ref[2 * row]), ranges_ref[2 * row + 1])


# ----------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(stats_ref, ranges_ref, q_ref, k_ref, v_ref, bnd_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                causal, scale, bq, bk, sq, nk, hm_count):
    b, h, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    hm = h if hm_count > 1 else 0

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    r0 = qi * bq
    r1 = jnp.minimum(r0 + bq, sq) - 1
    c0 = ki * bk
    computed, full = classify(r0, r1, c0, c0 + bk - 1, _tile_stats(stats_ref, b, hm, ki, hm_count=hm_count, nk=nk),
                              causal)

    def body(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot_nt(q, k) * scale  # [bq, bk]
        if masked:
            i = r0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            j = c0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            bnd = bnd_ref[...]  # [4, bk]
            vis = _visible(i, j, bnd[0:1], bnd[1:2], bnd[2:3], bnd[3:4], causal)
            s = jnp.where(vis, s, MASK_VALUE)
        m_prev, l_prev = m_sc[...], l_sc[...]  # [bq, 128], lanes equal
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_next[:, :1])
        if masked:
            p = jnp.where(vis, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v)

    @pl.when(computed & full)
    def _full():
        body(False)

    @pl.when(computed & jnp.logical_not(full))
    def _partial():
        body(True)

    @pl.when(ki == nk - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        empty = l == 0.0
        safe_l = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / safe_l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))


def forward(q, k, v, bnd_rows, stats, q_ranges, *, causal, scale, bq, bk, sq, hm_count, interpret):
    """q [B, Hq, Sq_p, D], k/v [B, Hkv, Sk_p, D], bnd_rows [B, Hm, 4, Sk_p] -> o like q, lse [B, Hq, Sq_p]."""
    bsz, hq, sq_p, d = q.shape
    hkv, sk_p = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = sq_p // bq, sk_p // bk

    def q_map(b, h, qi, ki, stats_ref, ranges_ref):
        return b, h, qi, 0

    def kv_map(b, h, qi, ki, stats_ref, ranges_ref):
        hm = h if hm_count > 1 else 0
        return b, h // g, _clamp_range(ranges_ref, (b * hm_count + hm) * nq + qi, ki), 0

    def bnd_map(b, h, qi, ki, stats_ref, ranges_ref):
        hm = h if hm_count > 1 else 0
        return b, hm, 0, _clamp_range(ranges_ref, (b * hm_count + hm) * nq + qi, ki)

    kernel = functools.partial(_fwd_kernel, causal=causal, scale=scale, bq=bq, bk=bk, sq=sq, nk=nk,
                               hm_count=hm_count)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, hq, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, 4, bk), bnd_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
            ],
            scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[out_struct(q.shape, q.dtype, q, k, v, bnd_rows, stats, q_ranges),
                   out_struct((bsz, hq, sq_p, NUM_LANES), jnp.float32, q, k, v, bnd_rows, stats, q_ranges)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flashmask_fwd",
    )(stats, q_ranges, q, k, v, bnd_rows)
    return o, lse[..., 0]


# ----------------------------------------------------------------------------------------------------
# Backward: dk, dv (grid over kv tiles; reduction over the group's query heads and the q tiles)


def _dkv_kernel(stats_ref, ranges_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bnd_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, causal, scale, bq, bk, sq, nk, nq, g, hm_count):
    b, hk, ki, r = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    qh = hk * g + r // nq
    qi = r % nq
    hm = qh if hm_count > 1 else 0

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    r0 = qi * bq
    r1 = jnp.minimum(r0 + bq, sq) - 1
    c0 = ki * bk
    computed, full = classify(r0, r1, c0, c0 + bk - 1, _tile_stats(stats_ref, b, hm, ki, hm_count=hm_count, nk=nk),
                              causal)

    def body(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        lse, delta = lse_ref[...], delta_ref[...]  # [1, bq]
        s_t = _dot_nt(k, q) * scale  # [bk, bq]: scores transposed, rows = keys
        p_t = jnp.exp(s_t - lse)
        if masked:
            j = c0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            i = r0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            bnd = bnd_ref[...]  # [bk, 4]
            vis = _visible(i, j, bnd[:, 0:1], bnd[:, 1:2], bnd[:, 2:3], bnd[:, 3:4], causal)
            p_t = jnp.where(vis, p_t, 0.0)
        dv_sc[...] += _dot(p_t.astype(do.dtype), do)
        dp_t = _dot_nt(v, do)  # [bk, bq]
        ds_t = p_t * (dp_t - delta)
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q)

    @pl.when(computed & full)
    def _full():
        body(False)

    @pl.when(computed & jnp.logical_not(full))
    def _partial():
        body(True)

    @pl.when(r == g * nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, bnd_cols, stats, kv_ranges, *, causal, scale, bq, bk, sq, hm_count,
                 interpret):
    """-> dk, dv [B, Hkv, Sk_p, D]. lse / delta [B, Hq, Sq_p] fp32; bnd_cols [B, Hm, Sk_p, 4]."""
    bsz, hq, sq_p, d = q.shape
    hkv, sk_p = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = sq_p // bq, sk_p // bk

    def _qh_qi(b, hk, ki, r, ranges_ref):
        qh = hk * g + r // nq
        hm = qh if hm_count > 1 else 0
        return qh, _clamp_range(ranges_ref, (b * hm_count + hm) * nk + ki, r % nq)

    def q_map(b, hk, ki, r, stats_ref, ranges_ref):
        qh, qi = _qh_qi(b, hk, ki, r, ranges_ref)
        return b, qh, qi, 0

    def row_map(b, hk, ki, r, stats_ref, ranges_ref):
        qh, qi = _qh_qi(b, hk, ki, r, ranges_ref)
        return b, qh, 0, qi

    def kv_map(b, hk, ki, r, stats_ref, ranges_ref):
        return b, hk, ki, 0

    def bnd_map(b, hk, ki, r, stats_ref, ranges_ref):
        hm = (hk * g + r // nq) if hm_count > 1 else 0
        return b, hm, ki, 0

    kernel = functools.partial(_dkv_kernel, causal=causal, scale=scale, bq=bq, bk=bk, sq=sq, nk=nk, nq=nq, g=g,
                               hm_count=hm_count)
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, hkv, nk, g * nq),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, 4), bnd_map),
            ],
            out_specs=[pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bk, d), kv_map)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[out_struct(k.shape, k.dtype, q, k, v, do, lse, bnd_cols, stats, kv_ranges),
                   out_struct(v.shape, v.dtype, q, k, v, do, lse, bnd_cols, stats, kv_ranges)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flashmask_bwd_dkv",
    )(stats, kv_ranges, q, do, lse[:, :, None, :], delta[:, :, None, :], k, v, bnd_cols)
    return dk, dv


# ----------------------------------------------------------------------------------------------------
# Backward: dq (grid over q tiles; reduction over kv tiles), same schedule as the forward


def _dq_kernel(stats_ref, ranges_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bnd_ref, dq_ref, dq_sc, *,
               causal, scale, bq, bk, sq, nk, hm_count):
    b, h, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    hm = h if hm_count > 1 else 0

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    r0 = qi * bq
    r1 = jnp.minimum(r0 + bq, sq) - 1
    c0 = ki * bk
    computed, full = classify(r0, r1, c0, c0 + bk - 1, _tile_stats(stats_ref, b, hm, ki, hm_count=hm_count, nk=nk),
                              causal)

    def body(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        s = _dot_nt(q, k) * scale  # [bq, bk]
        p = jnp.exp(s - lse)
        if masked:
            i = r0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            j = c0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            bnd = bnd_ref[...]
            vis = _visible(i, j, bnd[0:1], bnd[1:2], bnd[2:3], bnd[3:4], causal)
            p = jnp.where(vis, p, 0.0)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta)
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(computed & full)
    def _full():
        body(False)

    @pl.when(computed & jnp.logical_not(full))
    def _partial():
        body(True)

    @pl.when(ki == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, bnd_rows, stats, q_ranges, *, causal, scale, bq, bk, sq, hm_count,
                interpret):
    """-> dq [B, Hq, Sq_p, D]."""
    bsz, hq, sq_p, d = q.shape
    hkv, sk_p = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = sq_p // bq, sk_p // bk

    def q_map(b, h, qi, ki, stats_ref, ranges_ref):
        return b, h, qi, 0

    def row_map(b, h, qi, ki, stats_ref, ranges_ref):
        return b, h, 0, qi

    def kv_map(b, h, qi, ki, stats_ref, ranges_ref):
        hm = h if hm_count > 1 else 0
        return b, h // g, _clamp_range(ranges_ref, (b * hm_count + hm) * nq + qi, ki), 0

    def bnd_map(b, h, qi, ki, stats_ref, ranges_ref):
        hm = h if hm_count > 1 else 0
        return b, hm, 0, _clamp_range(ranges_ref, (b * hm_count + hm) * nq + qi, ki)

    kernel = functools.partial(_dq_kernel, causal=causal, scale=scale, bq=bq, bk=bk, sq=sq, nk=nk,
                               hm_count=hm_count)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, hq, nq, nk),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, 1, bq), row_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, 4, bk), bnd_map),
            ],
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=out_struct(q.shape, q.dtype, q, k, v, do, lse, bnd_rows, stats, q_ranges),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="flashmask_bwd_dq",
    )(stats, q_ranges, q, do, lse[:, :, None, :], delta[:, :, None, :], k, v, bnd_rows)
