"""The quantized matmuls (`quantized_matmul`, `quantized_gmm`), their tiling heuristic (`choose_tiling`), the
per-token int8 rounding of the activations (`quantize_activations`) and stacks of quantized expert weights
(`quantize_stack`, `stack`).

Stacks: a QuantizedTensor whose arrays carry a leading group axis (codes [G, K * bits / 8, N], scales and zeros
[G, K / g, N]) while `shape` stays the (K, N) of one group's weight, as `jax.vmap(format.quantize)` makes it;
`jax.vmap(format.dequantize)` reads it back. (format.check_tensor / bytes_ratio take one [K, N] weight;
`check_stack` here checks a stack.)

Forward only (inference): no custom VJP.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.qmm import kernel
from pallas_kernels.qmm.format import QuantizedTensor, check_layout, check_tensor, quantize
from pallas_kernels.target import on_target

Tiles = tuple[int, int, int]

ACTIVATION_BITS = (None, 8)
_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
SUBLANE, LANE = 8, 128  # TPU block-shape rule: the last two block dims are multiples of (8, 128) or full
VMEM_BUDGET = 12 * 2**20  # per kernel; under the 16 MiB default scoped VMEM of v4 / v5 (v6e has 32 MiB)
TK_CAP = 1024  # K-tile cap: the dequantized [tk, tn] tile is a kernel value, not a pipelined buffer


# --- stacks of expert weights -------------------------------------------------------------------------------


def quantize_stack(w: jax.Array, bits: int, group_size: int | None = None, *, symmetric: bool = True
                   ) -> QuantizedTensor:
    """w [G, K, N] -> one QuantizedTensor with a leading group axis (each group quantized as `format.quantize`)."""
    if w.ndim != 3:
        raise ValueError(f"quantize_stack takes [G, K, N] weights, got shape {tuple(w.shape)}")
    g, k, n = w.shape
    check_layout(k, n, bits, k if group_size is None else group_size, name=f"weight stack [{g}, {k}, {n}]")
    return jax.vmap(lambda wi: quantize(wi, bits, group_size, symmetric=symmetric))(w)


def stack(qts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Quantized [K, N] weights of one layout (bits, group_size, shape, symmetry) -> a stack along a new axis 0."""
    if not qts:
        raise ValueError("stack: no weights to stack")
    first = qts[0]
    for i, qt in enumerate(qts):
        check_tensor(qt, name=f"stack: weight {i}")
        if (qt.bits, qt.group_size, qt.shape, qt.symmetric) != (first.bits, first.group_size, first.shape,
                                                                first.symmetric):
            raise ValueError(f"stack: weight {i} has (bits, group_size, shape, symmetric) = "
                             f"{(qt.bits, qt.group_size, qt.shape, qt.symmetric)}, weight 0 "
                             f"{(first.bits, first.group_size, first.shape, first.symmetric)}")
    return jax.tree.map(lambda *a: jnp.stack(a), *qts)


def check_stack(qts: QuantizedTensor, *, name: str = "rhs") -> int:
    """ValueError naming `name` when a stack's arrays disagree with its layout; returns the group count G."""
    if qts.codes.ndim != 3:
        raise ValueError(f"{name}: a stack's codes are [G, K * bits / 8, N], got shape {tuple(qts.codes.shape)}")
    check_tensor(qts, name=name, lead=qts.codes.shape[:1])
    return qts.codes.shape[0]


# --- activations --------------------------------------------------------------------------------------------


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token symmetric int8: x [M, K] -> (codes [M, K] int8, scales [M, 1] fp32), s = absmax / 127 (1 for a
    zero row), codes = clip(round(x / s), -127, 127)."""
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8), s


# --- tiling -------------------------------------------------------------------------------------------------


def _divisor_tile(dim: int, cap: int, unit: int) -> int:
    """The largest multiple of `unit` that divides dim and is <= cap (preferring multiples of 2 * unit, the v6e
    MXU width when unit = 128); dim itself when it fits under cap or no such multiple exists."""
    if dim <= cap:
        return dim
    for align in (2 * unit, unit):
        for t in range(cap // align * align, 0, -align):
            if dim % t == 0:
                return t
    return dim


def _whole_groups(tk: int, group_size: int, bits: int) -> bool:
    """Whether a K-tile of tk rows can be unpacked alone: whole groups, or (8-bit codes, one per byte, no
    planes) a part of one group."""
    return tk % group_size == 0 or (bits == 8 and group_size % tk == 0)


def _k_tiles(k: int, group_size: int, bits: int, cap: int) -> list[int]:
    """Legal K-tiles, largest first: all of K when K <= cap, then the multiples of 128 (lane dim of x's block)
    <= cap that divide K and are `_whole_groups`; all of K last when K > cap (the fallback)."""
    smaller = [t for t in range(min(cap, k) // LANE * LANE, 0, -LANE)
               if k % t == 0 and t != k and _whole_groups(t, group_size, bits)]
    return [k] + smaller if k <= cap else smaller + [k]


def vmem_bytes(tiles: Tiles, *, k: int, bits: int, group_size: int, x_bytes: int, out_bytes: int,
               int8: bool, asym: bool) -> int:
    """VMEM of one kernel with these (tm, tk, tn): double-buffered blocks (x, codes, the scales / zeros stripes,
    x's scales, output), the fp32 accumulator and the unpacked / dequantized tile values."""
    tm, tk, tn = tiles
    stripe = -(-(k // group_size) // SUBLANE) * SUBLANE * tn * 4
    blocks = tm * tk * x_bytes + tk * bits // 8 * tn + stripe * (2 if asym else 1) + tm * tn * out_bytes
    if int8:
        blocks += tm * LANE * 4  # [tm, 1] fp32 pads to 128 lanes
        values = tk * tn * 4 + min(group_size, tk) * tn * 5 + 2 * tm * tn * 4  # int32 codes, a group's int8, partials
    else:
        values = tk * tn * (4 + 4 + x_bytes)  # int32 codes, fp32 values, the tile in x's dtype
    return 2 * blocks + 4 * tm * tn + values


def choose_tiling(m: int, k: int, n: int, *, bits: int, group_size: int, x_dtype=jnp.bfloat16, out_dtype=None,
                  activation_bits: int | None = None, num_groups: int = 1, interpret: bool = False) -> Tiles:
    """(tm, tk, tn) for x [m, k] @ a quantized [k, n] weight (num_groups of them for `quantized_gmm`).

    TPU: tm = all rows up to 512 (decode batches: the weight streams once), else 512 / 256 / 128 dividing M
    (grouped: the average group size as a power of two in [128, 512], as gmm); tn a multiple of 256, else 128,
    dividing N, up to 512; tk the largest multiple of 128 <= 1024 that divides K and is a whole number of groups
    (8-bit codes: or divides a group), else all of K (e.g. a per-channel 4-bit weight). Then tn, tk, tm are
    lowered (in that order) until the blocks and tile values fit VMEM_BUDGET.

    Interpret mode (CPU) costs a fixed time per grid step: tk = K, tn = N, tm ~ the average group size
    rounded up to a power of two in [8, 1024] (all rows for a dense call up to 1024)."""
    m, k, n = max(1, m), max(1, k), max(1, n)
    g = max(1, num_groups)
    if interpret:
        tm = min(1024, max(8, 2 ** math.ceil(math.log2(max(1, -(-m // g))))))
        return (min(tm, m), k, n)
    if num_groups > 1:
        tm = min(512, max(128, 2 ** math.floor(math.log2(max(1, m // g)))))
        tm = m if m <= tm else tm
    else:
        tm = m if m <= 512 else next((t for t in (512, 256, 128) if m % t == 0), 256)
    xb = 1 if activation_bits == 8 else jnp.dtype(x_dtype).itemsize
    ob = jnp.dtype(x_dtype if out_dtype is None else out_dtype).itemsize
    tks = _k_tiles(k, group_size, bits, TK_CAP)
    tk = tks[0]
    tn = _divisor_tile(n, 512, LANE)

    def fits(tm_, tk_, tn_):
        return vmem_bytes((tm_, tk_, tn_), k=k, bits=bits, group_size=group_size, x_bytes=xb, out_bytes=ob,
                          int8=activation_bits == 8, asym=True) <= VMEM_BUDGET

    def halve_tm(floor):
        return tm // 2 if tm > floor and (tm // 2) % 32 == 0 else tm  # (32: int8 rows pack 32 to a tile)

    while not fits(tm, tk, tn):
        smaller_n = _divisor_tile(n, tn // 2, LANE) if tn > LANE else tn
        smaller_k = next((t for t in tks if t < tk), tk)
        if tn > 256 and smaller_n < tn:
            tn = smaller_n
        elif tk > 256 and smaller_k < tk:
            tk = smaller_k
        elif halve_tm(128) < tm:
            tm = halve_tm(128)
        elif smaller_n < tn:
            tn = smaller_n
        elif smaller_k < tk:
            tk = smaller_k
        elif halve_tm(32) < tm:  # large groups of packed codes (a per-channel 4-bit weight): all of K per tile
            tm = halve_tm(32)
        else:
            break  # the smallest legal blocks; Mosaic reports what does not fit
    return (tm, tk, tn)


def _legal(tiles, m: int, k: int, n: int, *, bits: int, group_size: int, interpret: bool, what: str) -> Tiles:
    """Clamp (tm, tk, tn) to the dims; ValueError unless tk is whole groups dividing K, tn divides N and (for the
    TPU kernel) the blocks are legal TPU blocks."""
    if tiles is None or len(tiles) != 3:
        raise ValueError(f"{what}: tiles must be (tm, tk, tn), got {tiles!r}")
    tm, tk, tn = (int(min(t, max(d, 1))) for t, d in zip(tiles, (m, k, n)))
    if min(tm, tk, tn) < 1:
        raise ValueError(f"{what}: tiles must be positive, got {tiles}")
    bad = []
    if k % tk or not _whole_groups(tk, group_size, bits):
        bad.append(f"tk={tk} must divide K={k} and be a whole number of groups (group_size={group_size})"
                   + (" or divide a group" if bits == 8 else ""))
    if n % tn:
        bad.append(f"tn={tn} must divide N={n}")
    if not interpret:
        if tm % SUBLANE and tm != m:
            bad.append(f"tm={tm} must be a multiple of {SUBLANE} or all {m} rows on TPU")
        if tk % LANE and tk != k:
            bad.append(f"tk={tk} must be a multiple of {LANE} or all of K={k} on TPU")
        if tn % LANE and tn != n:
            bad.append(f"tn={tn} must be a multiple of {LANE} or all of N={n} on TPU")
        if (tk * bits // 8) % SUBLANE and tk != k:
            bad.append(f"tk={tk} gives {tk * bits // 8} rows of {bits}-bit codes, not a multiple of {SUBLANE}")
    if bad:
        raise ValueError(f"{what}: tiles {tiles} for x [{m}, {k}] @ weight [{k}, {n}]: " + "; ".join(bad))
    return tm, tk, tn


# --- the ops ------------------------------------------------------------------------------------------------


def _check_x(x, k: int, activation_bits, what: str, name: str = "x"):
    if x.ndim != 2:
        raise ValueError(f"{what}: {name} must be [M, K], got shape {tuple(x.shape)}")
    if jnp.dtype(x.dtype) not in _SUPPORTED:
        raise ValueError(f"{what}: {name} must be float32 or bfloat16, got {x.dtype}")
    if x.shape[1] != k:
        raise ValueError(f"{what}: {name} {tuple(x.shape)} has K={x.shape[1]} but the weight is [K, N] = [{k}, ...]: "
                         f"{name}.shape[1] must equal the weight's shape[0] = {k}")
    if activation_bits not in ACTIVATION_BITS:
        raise ValueError(f"{what}: activation_bits={activation_bits!r} is not supported (None: weight-only, "
                         f"8: per-token int8 activations)")


def _targets(interpret):
    return (False, True) if interpret is None else (bool(interpret),)


def quantized_matmul(x: jax.Array, qt: QuantizedTensor, *, activation_bits: int | None = None,
                     tiles: Tiles | None = None, interpret: bool | None = None, out_dtype=None) -> jax.Array:
    """x [M, K] @ the quantized weight qt ([K, N]) -> [M, N], fp32 accumulation.

    activation_bits: None = weight-only (x bf16 / fp32 multiplies the dequantized tile in x's dtype); 8 = x
        rounded per token to int8 (`quantize_activations`), int8 x int8 dots with int32 accumulation per group.
    tiles: (tm, tk, tn), tk dividing K and a whole number of groups (8-bit codes: or a divisor of the group),
        tn dividing N (M may be ragged); None for `choose_tiling`.
    interpret: True the Pallas interpreter, False the Mosaic TPU kernel, None chosen when lowering (Mosaic for
        TPU, AOT from a CPU host included); user tiles must then be legal TPU blocks.
    out_dtype: default x.dtype."""
    check_tensor(qt, name="qt")
    k, n = qt.shape
    _check_x(x, k, activation_bits, "quantized_matmul")
    m = x.shape[0]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    int8 = activation_bits == 8
    plans = {t: _legal(tiles or choose_tiling(m, k, n, bits=qt.bits, group_size=qt.group_size, x_dtype=x.dtype,
                                              out_dtype=out_dtype, activation_bits=activation_bits, interpret=t),
                       m, k, n, bits=qt.bits, group_size=qt.group_size, interpret=t, what="quantized_matmul")
             for t in _targets(interpret)}  # every target's, checked before tracing
    xs = None
    if int8:
        x, xs = quantize_activations(x)

    def run(x, xs, qt, *, interpret: bool):
        return kernel.qmm_call(x, xs, qt, tiling=plans[interpret], out_dtype=out_dtype,
                               compute_dtype=jnp.dtype(x.dtype) if not int8 else jnp.dtype(jnp.int8),
                               interpret=interpret)

    return on_target(interpret, run, x, xs, qt)


def quantized_gmm(lhs: jax.Array, rhs: QuantizedTensor, group_sizes: jax.Array, *,
                  activation_bits: int | None = None, tiles: Tiles | None = None,
                  group_offset: int | jax.Array | None = None, interpret: bool | None = None,
                  out_dtype=None) -> jax.Array:
    """Grouped quantized matmul (MoE experts): out[rows of group g] = lhs[rows of g] @ rhs[g - group_offset].

    lhs: [M, K], rows sorted by group (group g owns the group_sizes[g] rows after those of groups < g).
    rhs: a stack of GL quantized [K, N] weights (`quantize_stack` / `stack`): codes [GL, K * bits / 8, N],
        scales / zeros [GL, K / g, N]; the local groups group_offset .. group_offset + GL - 1.
    group_sizes: [G] int, G >= GL; sum(group_sizes) <= M. Same group semantics as `pallas_kernels.gmm.gmm`.
    activation_bits, tiles, interpret, out_dtype: as in `quantized_matmul` (tiles along M, K, N).

    Returns [M, N]; rows of non-local groups and rows past sum(group_sizes) are zero. Forward only."""
    gl = check_stack(rhs)
    k, n = rhs.shape
    _check_x(lhs, k, activation_bits, "quantized_gmm", name="lhs")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"quantized_gmm: group_sizes must be a 1-D integer array, got {group_sizes.shape} "
                         f"{group_sizes.dtype}")
    if gl > group_sizes.shape[0]:
        raise ValueError(f"quantized_gmm: rhs has {gl} groups but group_sizes only {group_sizes.shape[0]}")
    m = lhs.shape[0]
    out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    int8 = activation_bits == 8
    plans = {t: _legal(tiles or choose_tiling(m, k, n, bits=rhs.bits, group_size=rhs.group_size,
                                              x_dtype=lhs.dtype, out_dtype=out_dtype,
                                              activation_bits=activation_bits, num_groups=gl, interpret=t),
                       m, k, n, bits=rhs.bits, group_size=rhs.group_size, interpret=t, what="quantized_gmm")
             for t in _targets(interpret)}
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    if offset.size != 1:
        raise ValueError(f"quantized_gmm: group_offset must be a scalar, got shape {offset.shape}")
    xs = None
    if int8:
        lhs, xs = quantize_activations(lhs)

    def run(x, xs, qts, sizes, off, *, interpret: bool):
        return kernel.qgmm_call(x, xs, qts, sizes, off, tiling=plans[interpret], out_dtype=out_dtype,
                                compute_dtype=jnp.dtype(x.dtype) if not int8 else jnp.dtype(jnp.int8),
                                interpret=interpret)

    return on_target(interpret, run, lhs, xs, rhs, group_sizes.astype(jnp.int32), offset.reshape(()))
