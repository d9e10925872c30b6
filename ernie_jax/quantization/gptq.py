"""GPTQ (Frantar et al., arXiv 2210.17323): weight quantization that feeds each row's rounding error back into
the rows not yet quantized, so that the layer's *output* x @ w moves as little as possible.

    acc = HessianAccumulator(k)
    for x in calibration_batches:                       # x [..., K]: the layer's inputs
        acc.add(x)
    h = acc.hessian()                                   # [K, K] = mean of x^T x
    qt = gptq(w, h, bits=2, group_size=64)              # w [K, N] -> QuantizedTensor (bits 8 / 4 / 2)
    w_hat = gptq_dequantized(w, h, bits=3, group_size=64)   # [K, N] float32, any bits 2..8

Our weights are [K, N] (x [T, K] @ w [K, N]), so GPTQ's "columns" (input dims) are our rows k. With
U the upper Cholesky factor of H^-1 (H^-1 = U^T U), row k is rounded on its group's grid and its error
e = (w_k - q_k) / U[k, k] is subtracted from every later row j as U[k, j] * e: the least-squares correction
of the output error given the rows already fixed. Rows go in blocks of `block_size`: inside a block each
row updates the block's later rows at once; the rows after the block get the whole block's errors in one
matmul (lazy batch update). Each group's grid (`format.group_grid`, round to nearest) is computed from the
group's *updated* rows when its first row is reached.

Ported rather than called from qwix (`qwix.contrib.gptq_core`): qwix's grid (integer zero point, symmetric
bound 2^(b-1) - 0.5) is not the per-group grid of `pallas_kernels.qmm.format`, so its codes would not be ours,
and it runs one eager Python step per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax

from pallas_kernels.qmm import format as qformat


class HessianAccumulator:
    """Running mean of x^T x [K, K] (float64) over calibration activations x [..., K], batch by batch."""

    def __init__(self, k: int):
        self.k = k
        self._sum = np.zeros((k, k), np.float64)
        self.count = 0

    def add(self, x) -> None:
        """Adds the rows of x [..., K] (leading dims flattened into tokens)."""
        if x.ndim < 1 or x.shape[-1] != self.k:
            raise ValueError(f"activations {tuple(x.shape)}: the last dim must be K={self.k} (x [..., K])")
        x2 = jnp.asarray(x, jnp.float32).reshape(-1, self.k)
        # float32 matmul per batch (fast), float64 running sum (exact enough over many batches)
        self._sum += np.asarray(jnp.matmul(x2.T, x2, precision=lax.Precision.HIGHEST), np.float64)
        self.count += x2.shape[0]

    def hessian(self) -> np.ndarray:
        """[K, K] float64 mean of x^T x over every row added (the scale does not matter to GPTQ)."""
        if self.count == 0:
            raise ValueError(f"HessianAccumulator [{self.k}, {self.k}]: no activations were added")
        return self._sum / self.count


def hessian(x) -> np.ndarray:
    """[K, K] float64 mean of x^T x for one batch of activations x [..., K]."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def prepare_hessian(h, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Damped H [K, K] float64 and the dead-input mask [K] bool. A dead input (H[k, k] == 0: x_k is always
    0) gets H[k, k] = 1 (its weight row is zeroed by `gptq`: it cannot change the output); then
    percdamp * mean(diag H) is added to the diagonal, which keeps H positive definite."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    return h, dead


def _upper_cholesky_of_inverse(h: np.ndarray, name: str) -> np.ndarray:
    """U [K, K] upper triangular with H^-1 = U^T U (float64).

    With J the order reversal and J H J = M M^T (M lower), U = J M^-1 J: one Cholesky and one triangular
    inverse instead of Cholesky, inverse and Cholesky again (a third of the flops)."""
    try:
        m = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
    except np.linalg.LinAlgError as err:
        raise ValueError(f"{name}: the damped Hessian [{h.shape[0]}, {h.shape[0]}] is not positive definite; "
                         f"raise percdamp") from err
    m_inv, info = scipy.linalg.lapack.dtrtri(m, lower=1)
    if info != 0:
        raise ValueError(f"{name}: the Cholesky factor of the damped Hessian is singular (LAPACK info={info})")
    return np.ascontiguousarray(m_inv[::-1, ::-1])


def _block_rows(k: int, g: int, block_size: int) -> int:
    """Rows per block: groups never straddle a block (a multiple of g dividing K when g <= block_size, else
    a divisor of g), so a group's first row always sees its rows fully updated."""
    if g <= block_size:
        return g * max(m for m in range(1, k // g + 1) if (k // g) % m == 0 and g * m <= block_size)
    return max(d for d in range(1, block_size + 1) if g % d == 0)


def _values(codes, scale, zero, bits: int):
    """Float values of unsigned codes [..., N] on the grid scale / zero [..., N] (format's dequantization)."""
    if zero is None:
        return (codes.astype(jnp.float32) - 2 ** (bits - 1)) * scale
    return codes.astype(jnp.float32) * scale + zero


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "block", "dynamic"))
def _quantize_rows(w, u, scales, zeros, gidx, *, bits, group_size, symmetric, block, dynamic):
    """The GPTQ loop over rows in processing order. w [K, N] f32; u [K, K] f32 upper Cholesky factor of H^-1;
    scales / zeros [G, N] the group grids (filled here when `dynamic`, given otherwise); gidx [K] int32 the
    group of each row. -> codes [K, N] int32, scales [G, N], zeros [G, N]."""
    k, n = w.shape
    g = group_size

    def new_grid(scales, zeros, gi, rows):  # rows [g, N]: the group's updated weights
        s, z = qformat.group_grid(rows, bits, symmetric)
        scales = scales.at[gi].set(s)
        return scales, (zeros if z is None else zeros.at[gi].set(z))

    def block_step(b, carry):
        w, codes, scales, zeros = carry
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(w, i1, block)  # [B, N]
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))  # [B, B]
        if dynamic and g > block:  # groups start only at block starts here, and reach past the block
            scales, zeros = lax.cond(
                i1 % g == 0, lambda: new_grid(scales, zeros, i1 // g, lax.dynamic_slice_in_dim(w, i1, g)),
                lambda: (scales, zeros))

        def row_step(i, c):
            w1, err1, codes1, scales, zeros = c
            if dynamic and g <= block:  # the group lies in this block: its rows are w1[i:i + g]
                scales, zeros = lax.cond(
                    i % g == 0, lambda: new_grid(scales, zeros, (i1 + i) // g, lax.dynamic_slice_in_dim(w1, i, g)),
                    lambda: (scales, zeros))
            gi = gidx[i1 + i]
            s, z = scales[gi], (None if symmetric else zeros[gi])
            row = w1[i]
            q = qformat.codes_on_grid(row[None], s, z, bits)[0]
            e = (row - _values(q, s, z, bits)) / u1[i, i]
            # u1 is upper triangular: rows before i (already quantized) get no update
            w1 = w1 - u1[i][:, None] * e[None, :]
            return w1, err1.at[i].set(e), codes1.at[i].set(q), scales, zeros

        init = (w1, jnp.zeros_like(w1), jnp.zeros((block, n), jnp.int32), scales, zeros)
        _, err1, codes1, scales, zeros = lax.fori_loop(0, block, row_step, init)
        # lazy batch update of the rows after the block (rows before it get 0; the block's own rows are done)
        w = w - jnp.matmul(lax.dynamic_slice_in_dim(u, i1, block).T, err1, precision=lax.Precision.HIGHEST)
        return w, lax.dynamic_update_slice_in_dim(codes, codes1, i1, 0), scales, zeros

    init = (w, jnp.zeros((k, n), jnp.int32), scales, zeros)
    _, codes, scales, zeros = lax.fori_loop(0, k // block, block_step, init)
    return codes, scales, zeros


def _check(w, h, bits: int, group_size: int, block_size: int, name: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{name}: GPTQ takes a [K, N] weight, got shape {tuple(w.shape)}")
    k, n = w.shape
    if tuple(h.shape) != (k, k):
        raise ValueError(f"{name} [{k}, {n}]: the Hessian must be [K, K] = [{k}, {k}], got {tuple(h.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name} [{k}, {n}]: bits={bits} must be in 2..8")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{name} [{k}, {n}]: group_size={group_size} must be positive and divide K={k}")
    if block_size <= 0:
        raise ValueError(f"{name} [{k}, {n}]: block_size={block_size} must be positive")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{name} [{k}, {n}]: the Hessian has non-finite entries")


def gptq_codes(w, h, bits: int, group_size: int, *, symmetric: bool = False, block_size: int = 128,
               act_order: bool = False, percdamp: float = 0.01, name: str = "weight"
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """GPTQ of w [K, N] given H [K, K] -> unsigned codes [K, N] int32, scales [K / group_size, N] and zeros
    [K / group_size, N] (None when symmetric), on `format`'s grid for any bits 2..8.

    act_order: rows go by decreasing H[k, k] (the most active inputs first, while the most rows remain to
    absorb their error). The groups stay contiguous in k (our format), so their grids are then computed up
    front from the original weights ("static groups") instead of from the updated ones."""
    w = np.asarray(w)
    h = np.asarray(h)
    _check(w, h, bits, group_size, block_size, name)
    k, n = w.shape
    g = group_size
    h, dead = prepare_hessian(h, percdamp)
    w = np.where(dead[:, None], 0.0, w.astype(np.float32))
    ngroups = k // g
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        s0, z0 = qformat.group_grid(jnp.asarray(w).reshape(ngroups, g, n), bits, symmetric)
        z0 = jnp.zeros_like(s0) if z0 is None else z0
    else:
        perm = np.arange(k)
        s0, z0 = jnp.ones((ngroups, n), jnp.float32), jnp.zeros((ngroups, n), jnp.float32)
    u = _upper_cholesky_of_inverse(h[np.ix_(perm, perm)], name)
    codes, scales, zeros = _quantize_rows(
        jnp.asarray(w[perm]), jnp.asarray(u, jnp.float32), s0, z0, jnp.asarray(perm // g, jnp.int32),
        bits=bits, group_size=g, symmetric=symmetric, block=_block_rows(k, g, block_size), dynamic=not act_order)
    codes = codes[np.argsort(perm)]  # back to the original row order
    return codes, scales, (None if symmetric else zeros)


def gptq(w, h, bits: int, group_size: int, *, symmetric: bool = False, block_size: int = 128,
         act_order: bool = False, percdamp: float = 0.01, name: str = "weight") -> qformat.QuantizedTensor:
    """GPTQ of w [K, N] given H [K, K] (see `gptq_codes`) as a packed QuantizedTensor (bits 8, 4 or 2)."""
    if np.ndim(w) == 2:  # the packed layout's rules (bits 8 / 4 / 2, whole bytes per group) first
        qformat.check_layout(*np.shape(w), bits, group_size, name=name)
    codes, scales, zeros = gptq_codes(w, h, bits, group_size, symmetric=symmetric, block_size=block_size,
                                      act_order=act_order, percdamp=percdamp, name=name)
    return qformat.from_codes(codes, scales, zeros, bits, group_size)


def gptq_dequantized(w, h, bits: int, group_size: int, *, symmetric: bool = False, block_size: int = 128,
                     act_order: bool = False, percdamp: float = 0.01, name: str = "weight") -> jax.Array:
    """GPTQ of w [K, N] given H [K, K] (see `gptq_codes`) as dequantized values [K, N] float32, for any bits
    2..8 (the packed format holds only 8 / 4 / 2)."""
    codes, scales, zeros = gptq_codes(w, h, bits, group_size, symmetric=symmetric, block_size=block_size,
                                      act_order=act_order, percdamp=percdamp, name=name)
    k, n = codes.shape
    cg = codes.reshape(k // group_size, group_size, n)
    z = None if zeros is None else zeros[:, None, :]
    return _values(cg, scales[:, None, :], z, bits).reshape(k, n)
