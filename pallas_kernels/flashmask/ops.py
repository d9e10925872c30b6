"""`flashmask_attention`: the differentiable op (custom_vjp over the Pallas kernels), validation of
`startend_row_indices`, block sizes, and the tile statistics.

Semantics of `startend_row_indices` [B, 1 or Hq, Sk, n] (Paddle's `flashmask_attention`), for key column j;
rows i are query positions 0..Sq-1, the lower-left triangle is i >= j and the upper-right one i < j:

* causal, n=1 [LTS]: lower-left rows i >= LTS[j] are masked (the upper-right is masked by causality);
* causal, n=2 [LTS, LTE]: lower-left rows LTS[j] <= i < LTE[j] are masked;
* non-causal, n=2 [LTS, UTE]: lower-left rows i >= LTS[j] and upper-right rows i < UTE[j] are masked;
* non-causal, n=4 [LTS, LTE, UTS, UTE]: lower-left rows LTS[j] <= i < LTE[j] and upper-right rows
  UTS[j] <= i < UTE[j] are masked.

All forms are turned into the canonical 4-row form [LTS, LTE, UTS, UTE] (`canonical_bounds`) that the
kernels, the oracle and the tile statistics share. A query row with every key masked outputs zeros and
gets zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flashmask import kernel as _k
from pallas_kernels.target import on_target

DEFAULT_BLOCK = 512  # TPU default for block_q / block_kv (capped by the padded sequence length)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return False


def validate_indices(startend_row_indices, *, causal: bool, batch: int, q_heads: int, kv_len: int,
                     q_len: int) -> None:
    """Raises ValueError for a wrong shape / dtype / column count; also for values outside
    [0, max(Sq, Sk)] when the indices are concrete (outside jit). Inside jit values are clamped."""
    idx = startend_row_indices
    shape, dtype = tuple(idx.shape), jnp.dtype(idx.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"startend_row_indices must be an integer array (int32), got dtype {dtype}")
    if len(shape) != 4:
        raise ValueError(f"startend_row_indices must be [B, 1 or Hq, Sk, n], got shape {shape}")
    b, h, sk, n = shape
    if b != batch or sk != kv_len or h not in (1, q_heads):
        raise ValueError(f"startend_row_indices shape {shape} does not match [B={batch}, 1 or Hq={q_heads}, "
                         f"Sk={kv_len}, n]")
    allowed = (1, 2) if causal else (2, 4)
    if n not in allowed:
        raise ValueError(f"startend_row_indices has n={n} bound columns; causal={causal} takes n in {allowed} "
                         "(causal: [LTS] or [LTS, LTE]; non-causal: [LTS, UTE] or [LTS, LTE, UTS, UTE])")
    if _is_concrete(idx) and idx.size:
        a = np.asarray(idx)
        hi = max(q_len, kv_len)
        lo_v, hi_v = int(a.min()), int(a.max())
        if lo_v < 0 or hi_v > hi:
            raise ValueError(f"startend_row_indices values must lie in [0, {hi}] (row bounds), got min {lo_v}, "
                             f"max {hi_v}")


def canonical_bounds(startend_row_indices, *, causal: bool, big: int) -> jax.Array:
    """[B, Hm, Sk, n] -> int32 [B, Hm, 4, Sk] rows [LTS, LTE, UTS, UTE]; an absent bound becomes 0 (start)
    or `big` (end, >= every row); causal masks the whole upper-right triangle ([0, big))."""
    idx = jnp.clip(jnp.asarray(startend_row_indices).astype(jnp.int32), 0, big)
    cols = [idx[..., t] for t in range(idx.shape[-1])]
    zero, inf = jnp.zeros_like(cols[0]), jnp.full_like(cols[0], big)
    n = len(cols)
    if causal:
        lts, lte = cols[0], (cols[1] if n == 2 else inf)
        uts, ute = zero, inf
    elif n == 2:
        lts, lte, uts, ute = cols[0], inf, zero, cols[1]
    else:
        lts, lte, uts, ute = cols
    return jnp.stack([lts, lte, uts, ute], axis=2)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    bq: int
    bk: int
    sq: int
    sk: int
    interpret: bool | None


def choose_blocks(sq: int, sk: int, block_q: int | None, block_kv: int | None, interpret: bool | None):
    """Block sizes: default min(512, the sequence rounded up to 128); TPU needs multiples of 128 (they are
    the lane dimension of the per-row statistics and per-column bounds); interpret mode takes multiples of 8."""
    bq = min(DEFAULT_BLOCK, _round_up(sq, 128)) if block_q is None else int(block_q)
    bk = min(DEFAULT_BLOCK, _round_up(sk, 128)) if block_kv is None else int(block_kv)
    mult = 8 if interpret else 128
    for name, blk in (("block_q", bq), ("block_kv", bk)):
        if blk <= 0 or blk % mult:
            raise ValueError(f"{name}={blk} must be a positive multiple of {mult}"
                             + ("" if interpret else " (on TPU; interpret=True takes multiples of 8)"))
    return bq, bk


def tile_tables(bounds, *, causal: bool, sq: int, bq: int, bk: int, nq: int):
    """From canonical padded bounds [B, Hm, 4, Sk_p]: the kernels' scalar-prefetch tables.

    Returns stats [B, Hm, nk, 8], computed [B, Hm, nq, nk], full [B, Hm, nq, nk], q_ranges [B, Hm, nq, 2]
    (first / last computed kv tile per q tile) and kv_ranges [B, Hm, nk, 2]."""
    b, hm, _, sk_p = bounds.shape
    nk = sk_p // bk
    t = bounds.reshape(b, hm, 4, nk, bk)
    st = jnp.stack([t.min(-1), t.max(-1)], axis=-1)  # [B, Hm, 4, nk, 2]
    stats = jnp.transpose(st, (0, 1, 3, 2, 4)).reshape(b, hm, nk, _k.NUM_STATS)
    r0 = jnp.arange(nq, dtype=jnp.int32)[:, None] * bq
    r1 = jnp.minimum(r0 + bq, sq) - 1
    c0 = jnp.arange(nk, dtype=jnp.int32)[None, :] * bk
    s = tuple(stats[:, :, None, :, t_] for t_ in range(_k.NUM_STATS))  # each [B, Hm, 1, nk]
    computed, full = _k.classify(r0, r1, c0, c0 + bk - 1, s, causal)
    computed = jnp.broadcast_to(computed, (b, hm, nq, nk))
    full = jnp.broadcast_to(full, (b, hm, nq, nk)) & computed

    def first_last(c):  # along the last axis; (0, 0) when nothing is computed
        n = c.shape[-1]
        first = jnp.argmax(c, axis=-1)
        last = n - 1 - jnp.argmax(c[..., ::-1], axis=-1)
        anyc = c.any(-1)
        return jnp.stack([jnp.where(anyc, first, 0), jnp.where(anyc, last, 0)], -1).astype(jnp.int32)

    return stats, computed, full, first_last(computed), first_last(jnp.swapaxes(computed, -1, -2))


def exact_tile_occupancy(bounds, *, causal: bool, sq: int, sk: int, bq: int, bk: int, nq: int):
    """Exact per tile: (any entry unmasked, every entry unmasked) [B, Hm, nq, nk], from per-column checks
    (O(nq * Sk) work, no dense mask). Padding rows / columns do not count."""
    b, hm, _, sk_p = bounds.shape
    nk = sk_p // bk
    lts, lte, uts, ute = (bounds[:, :, t, None, :] for t in range(4))  # [B, Hm, 1, Sk_p]
    j = jnp.arange(sk_p, dtype=jnp.int32)[None, :]
    r0 = jnp.arange(nq, dtype=jnp.int32)[:, None] * bq
    r1 = jnp.minimum(r0 + bq, sq) - 1  # [nq, 1]
    real_col = j < sk
    # lower-left rows of column j in the tile: [max(r0, j), r1]; the masked ones are [LTS, LTE)
    lo, hi = jnp.maximum(r0, j), r1
    ll_rows = lo <= hi
    ll_any = ll_rows & ((lo < lts) | (hi >= lte) | (lts >= lte))
    ll_all = ~ll_rows | (lts > hi) | (lte <= lo) | (lts >= lte)
    # upper-right rows: [r0, min(r1, j - 1)]
    lo2, hi2 = r0, jnp.minimum(r1, j - 1)
    ur_rows = lo2 <= hi2
    if causal:
        ur_any = jnp.zeros_like(ur_rows)
        ur_all = ~ur_rows
    else:
        ur_any = ur_rows & ((lo2 < uts) | (hi2 >= ute) | (uts >= ute))
        ur_all = ~ur_rows | (uts > hi2) | (ute <= lo2) | (uts >= ute)
    col_any = (ll_any | ur_any) & real_col  # [B, Hm, nq, Sk_p]
    col_all = (ll_all & ur_all) | ~real_col
    any_ = col_any.reshape(b, hm, nq, nk, bk).any(-1)
    all_ = col_all.reshape(b, hm, nq, nk, bk).all(-1)
    return any_, all_


def _prepare(startend_row_indices, *, causal, sq, sk, bq, bk):
    sq_p, sk_p = _round_up(sq, bq), _round_up(sk, bk)
    big = max(sq_p, sk_p)
    bounds = canonical_bounds(startend_row_indices, causal=causal, big=big)
    # padding columns are masked everywhere: [0, big) in both triangles
    pad = jnp.asarray([0, big, 0, big], jnp.int32)[None, None, :, None]
    bounds = jnp.concatenate([bounds, jnp.broadcast_to(pad, bounds.shape[:2] + (4, sk_p - sk))], axis=-1)
    return bounds, sq_p // bq


def tile_statistics(startend_row_indices, *, causal: bool, q_len: int, block_q: int, block_kv: int) -> dict:
    """How many (batch, mask-head, q tile, kv tile) tiles the kernel computes vs how many contain an unmasked
    entry (exact), plus how many it runs without mask arithmetic and how many are fully unmasked (exact).
    With Hm = 1 every query head repeats these per-mask-head counts. Plain JAX on O(nq * Sk) data (no
    dense mask); returns Python numbers, so call it outside jit.

    Returns dict(total, computed, nonempty, full, all_visible, density): computed >= nonempty always;
    they are equal when the min/max tile test is exact (every structured mask in masks.py);
    density = fraction of unmasked (row, column) entries."""
    sk = startend_row_indices.shape[2]
    bounds, nq = _prepare(startend_row_indices, causal=causal, sq=q_len, sk=sk, bq=block_q, bk=block_kv)
    _, computed, full, _, _ = tile_tables(bounds, causal=causal, sq=q_len, bq=block_q, bk=block_kv, nq=nq)
    any_, all_ = exact_tile_occupancy(bounds, causal=causal, sq=q_len, sk=sk, bq=block_q, bk=block_kv, nq=nq)
    # density from per-column visible-row counts (O(Sk))
    lts, lte, uts, ute = (bounds[:, :, t, :sk] for t in range(4))
    j = jnp.arange(sk, dtype=jnp.int32)

    def overlap(a0, a1, m0, m1):  # |[a0, a1) ∩ [m0, m1)|
        return jnp.maximum(0, jnp.minimum(a1, m1) - jnp.maximum(a0, m0))

    ll_n = jnp.maximum(0, q_len - j) - overlap(jnp.minimum(j, q_len), q_len, lts, lte)
    ur_n = 0 if causal else jnp.minimum(j, q_len) - overlap(0, jnp.minimum(j, q_len), uts, ute)
    visible = jnp.sum(ll_n + ur_n)
    return dict(total=int(computed.size), computed=int(computed.sum()), nonempty=int(any_.sum()),
                full=int(full.sum()), all_visible=int(all_.sum()),
                density=float(visible) / float(computed.shape[0] * computed.shape[1] * q_len * sk))


def _to_kernel(x, s_p):
    """[B, S, H, D] -> [B, H, S_p, D] zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, s_p - x.shape[2]), (0, 0)))


def _call(fn, *args, interpret, **kw):
    """Runs a kernel on the target chosen by `interpret` (None: when lowering, `pallas_kernels.target`)."""
    return on_target(interpret, functools.partial(fn, **kw), *args)


def _forward(q, k, v, bounds, st: _Static):
    sq_p, sk_p = _round_up(st.sq, st.bq), _round_up(st.sk, st.bk)
    nq = sq_p // st.bq
    hm = bounds.shape[1]
    stats, _, _, q_ranges, kv_ranges = tile_tables(bounds, causal=st.causal, sq=st.sq, bq=st.bq, bk=st.bk, nq=nq)
    qt, kt, vt = _to_kernel(q, sq_p), _to_kernel(k, sk_p), _to_kernel(v, sk_p)
    stats_f, qr_f, kr_f = stats.reshape(-1), q_ranges.reshape(-1), kv_ranges.reshape(-1)
    o_t, lse = _call(_k.forward, qt, kt, vt, bounds, stats_f, qr_f, interpret=st.interpret, causal=st.causal,
                     scale=st.scale, bq=st.bq, bk=st.bk, sq=st.sq, hm_count=hm)
    out = jnp.swapaxes(o_t[:, :, :st.sq], 1, 2)
    return out, (qt, kt, vt, o_t, lse, bounds, stats_f, qr_f, kr_f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flashmask(q, k, v, bounds, st: _Static):
    return _forward(q, k, v, bounds, st)[0]


def _flashmask_fwd(q, k, v, bounds, st: _Static):
    return _forward(q, k, v, bounds, st)


def _flashmask_bwd(st: _Static, res, g):
    qt, kt, vt, o_t, lse, bounds, stats_f, qr_f, kr_f = res
    sq_p = qt.shape[2]
    hm = bounds.shape[1]
    do_t = _to_kernel(g, sq_p)
    delta = jnp.sum(do_t.astype(jnp.float32) * o_t.astype(jnp.float32), axis=-1)  # [B, Hq, Sq_p]
    kw = dict(causal=st.causal, scale=st.scale, bq=st.bq, bk=st.bk, sq=st.sq, hm_count=hm)
    dk, dv = _call(_k.backward_dkv, qt, kt, vt, do_t, lse, delta, jnp.swapaxes(bounds, 2, 3), stats_f, kr_f,
                   interpret=st.interpret, **kw)
    dq = _call(_k.backward_dq, qt, kt, vt, do_t, lse, delta, bounds, stats_f, qr_f, interpret=st.interpret, **kw)
    dq = jnp.swapaxes(dq[:, :, :st.sq], 1, 2)
    dk = jnp.swapaxes(dk[:, :, :st.sk], 1, 2)
    dv = jnp.swapaxes(dv[:, :, :st.sk], 1, 2)
    return dq, dk, dv, np.zeros(bounds.shape, jax.dtypes.float0)


_flashmask.defvjp(_flashmask_fwd, _flashmask_bwd)


def flashmask_attention(q: jax.Array, k: jax.Array, v: jax.Array, startend_row_indices: jax.Array, *,
                        causal: bool, scale: float | None = None, block_q: int | None = None,
                        block_kv: int | None = None, interpret: bool | None = False) -> jax.Array:
    """FlashMask attention. q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D] (Hq a multiple of Hkv: query head h
    uses kv head h // (Hq / Hkv)), startend_row_indices int [B, 1 or Hq, Sk, n] (module docstring)
    -> [B, Sq, Hq, D] in q's dtype. Softmax in fp32; differentiable in q, k, v (custom_vjp).

    scale: default D ** -0.5. block_q / block_kv: tile sizes (default min(512, S rounded up to 128)).
    interpret: True runs the Pallas interpreter (CPU tests), False the Mosaic TPU kernel, None chooses by
    the platform being lowered for.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    b, sq, hq, d = q.shape
    _, sk, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    validate_indices(startend_row_indices, causal=causal, batch=b, q_heads=hq, kv_len=sk, q_len=sq)
    bq, bk = choose_blocks(sq, sk, block_q, block_kv, interpret)
    scale = d ** -0.5 if scale is None else float(scale)
    bounds, _ = _prepare(startend_row_indices, causal=causal, sq=sq, sk=sk, bq=bq, bk=bk)
    return _flashmask(q, k, v, bounds, _Static(bool(causal), scale, bq, bk, sq, sk, interpret))
