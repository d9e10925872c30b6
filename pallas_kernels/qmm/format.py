"""Quantized weights: integer codes packed along K, one scale (and zero) per group of K rows per column.

    qt = quantize(w, bits=4, group_size=128)          # w [K, N] -> QuantizedTensor
    w_hat = dequantize(qt)                            # [K, N] float32

Per group of `group_size` consecutive rows k of one column n (round to nearest):
- symmetric: code u = clip(round(w / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1), s = absmax / (2^(b-1) - 1)
  (2 bits symmetric: levels -1, 0, 1); value = (u - 2^(b-1)) * s;
- asymmetric: u = clip(round((w - z) / s), 0, 2^b - 1), s = (max - min) / (2^b - 1), z = min;
  value = u * s + z (z is the value of code 0, kept as a float so that RTN's error stays <= s / 2).

Packing (the kernel's "bit-shift dequantization"): P = 8 // bits codes per uint8. Inside each group the
g = group_size rows are cut into P planes of g / P consecutive rows; byte i of the group holds row
r * g / P + i of the group at bits [r * bits, (r + 1) * bits), r = 0..P-1. A kernel tile of whole groups
unpacks plane r with `(byte >> (r * bits)) & mask` into a contiguous block of rows, so it multiplies plane r
by a contiguous slice of x's columns: no interleaving shuffle on the TPU's sublanes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BITS = (8, 4, 2)


@struct.dataclass
class QuantizedTensor:
    """codes [K * bits / 8, N] uint8 (packed, see the module docstring); scales [K / group_size, N];
    zeros [K / group_size, N] (asymmetric) or None (symmetric)."""
    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)  # (K, N) of the full-precision weight

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros together (the storage a weight-bytes figure counts)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scales, self.zeros) if a is not None)


def check_layout(k: int, n: int, bits: int, group_size: int, *, name: str = "weight") -> None:
    """ValueError naming `name`, its shape and the rule when (bits, group_size) cannot quantize [k, n]."""
    if bits not in BITS:
        raise ValueError(f"{name} [{k}, {n}]: bits={bits} is not supported (one of {BITS})")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{name} [{k}, {n}]: group_size={group_size} must be positive and divide K={k}")
    per_byte = 8 // bits
    if group_size % per_byte:
        raise ValueError(f"{name} [{k}, {n}]: {bits}-bit codes pack {per_byte} per byte along K, so group_size="
                         f"{group_size} must be a multiple of {per_byte}")


def levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) integer level q of the grid; the stored code is q + 2^(bits-1) when symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def group_grid(w: jax.Array, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array | None]:
    """Round-to-nearest grid of each group: w [..., g, N] -> scale [..., N] (zero [..., N] or None).
    A constant group gets scale 1 (any scale represents it exactly)."""
    w = w.astype(jnp.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = jnp.max(jnp.abs(w), axis=-2) / qmax
        return jnp.where(s > 0, s, 1.0), None
    lo, hi = jnp.min(w, axis=-2), jnp.max(w, axis=-2)
    s = (hi - lo) / (2 ** bits - 1)
    return jnp.where(s > 0, s, 1.0), lo


def codes_on_grid(w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
    """Unsigned codes [..., g, N] int32 of w [..., g, N] on the grid (scale, zero) [..., N] (round to nearest)."""
    w = w.astype(jnp.float32)
    if zero is None:
        lo, hi = levels(bits, True)
        return jnp.clip(jnp.round(w / scale[..., None, :]), lo, hi).astype(jnp.int32) - lo
    lo, hi = levels(bits, False)
    return jnp.clip(jnp.round((w - zero[..., None, :]) / scale[..., None, :]), lo, hi).astype(jnp.int32)


def pack(codes: jax.Array, bits: int, group_size: int) -> jax.Array:
    """Unsigned codes [K, N] (each < 2^bits) -> packed uint8 [K * bits / 8, N] (planes inside each group)."""
    k, n = codes.shape
    p = 8 // bits
    c = codes.astype(jnp.uint32).reshape(k // group_size, p, group_size // p, n)  # [groups, plane, i, N]
    shifts = (jnp.arange(p, dtype=jnp.uint32) * bits)[None, :, None, None]
    return jnp.sum(c << shifts, axis=1, dtype=jnp.uint32).astype(jnp.uint8).reshape(k // p, n)


def unpack(packed: jax.Array, bits: int, group_size: int) -> jax.Array:
    """packed uint8 [K * bits / 8, N] -> unsigned codes [K, N] int32 (the inverse of `pack`)."""
    kp, n = packed.shape
    p = 8 // bits
    b = packed.astype(jnp.int32).reshape(kp // (group_size // p), 1, group_size // p, n)
    shifts = (jnp.arange(p, dtype=jnp.int32) * bits)[None, :, None, None]
    return ((b >> shifts) & (2 ** bits - 1)).reshape(kp * p, n)


def from_codes(codes: jax.Array, scales: jax.Array, zeros: jax.Array | None, bits: int, group_size: int
               ) -> QuantizedTensor:
    """A QuantizedTensor from unsigned codes [K, N] chosen elsewhere (GPTQ) on the grid scales / zeros
    [K / group_size, N]."""
    k, n = codes.shape
    check_layout(k, n, bits, group_size)
    want = (k // group_size, n)
    for what, a in (("scales", scales), ("zeros", zeros)):
        if a is not None and tuple(a.shape) != want:
            raise ValueError(f"{what} of a [{k}, {n}] weight with group_size={group_size} must be {want}, "
                             f"got {tuple(a.shape)}")
    return QuantizedTensor(codes=pack(codes, bits, group_size), scales=jnp.asarray(scales, jnp.float32),
                           zeros=None if zeros is None else jnp.asarray(zeros, jnp.float32), bits=bits,
                           group_size=group_size, shape=(k, n))


def quantize(w: jax.Array, bits: int, group_size: int | None = None, *, symmetric: bool = True,
             name: str = "weight") -> QuantizedTensor:
    """Round-to-nearest quantization of w [K, N]; group_size None = one group per column (per channel)."""
    if w.ndim != 2:
        raise ValueError(f"{name}: quantize takes a [K, N] matrix, got shape {tuple(w.shape)}")
    k, n = w.shape
    g = k if group_size is None else group_size
    check_layout(k, n, bits, g, name=name)
    wg = jnp.asarray(w, jnp.float32).reshape(k // g, g, n)
    scale, zero = group_grid(wg, bits, symmetric)
    codes = codes_on_grid(wg, scale, zero, bits).reshape(k, n)
    return from_codes(codes, scale, zero, bits, g)


def dequantize(qt: QuantizedTensor) -> jax.Array:
    """[K, N] float32 values of the codes."""
    k, n = qt.shape
    g = qt.group_size
    u = unpack(qt.codes, qt.bits, g).reshape(k // g, g, n).astype(jnp.float32)
    if qt.symmetric:
        return ((u - 2 ** (qt.bits - 1)) * qt.scales[:, None, :]).reshape(k, n)
    return (u * qt.scales[:, None, :] + qt.zeros[:, None, :]).reshape(k, n)


def check_tensor(qt: QuantizedTensor, *, name: str = "weight", lead: tuple[int, ...] = ()) -> None:
    """ValueError naming `name` when the codes, scales and zeros of a (loaded) QuantizedTensor disagree; `lead`:
    the leading axes of a stack of them (e.g. (G,) for MoE experts)."""
    k, n = qt.shape
    check_layout(k, n, qt.bits, qt.group_size, name=name)
    want = {"codes": lead + (k * qt.bits // 8, n), "scales": lead + (k // qt.group_size, n)}
    if qt.zeros is not None:
        want["zeros"] = want["scales"]
    what_weight = f"a stack {list(lead)} of [{k}, {n}]" if lead else f"a [{k}, {n}]"
    for what, shape in want.items():
        got = tuple(getattr(qt, what).shape)
        if got != shape:
            raise ValueError(f"{name}: {what} of {what_weight} {qt.bits}-bit weight with group_size={qt.group_size} "
                             f"must be {shape}, got {got}")
    if qt.codes.dtype != jnp.uint8:
        raise ValueError(f"{name}: codes must be uint8, got {qt.codes.dtype}")


def bytes_ratio(qt: QuantizedTensor, dtype=jnp.bfloat16) -> float:
    """Storage of the quantized weight over the same [K, N] weight in `dtype`."""
    return qt.nbytes / (math.prod(qt.shape) * jnp.dtype(dtype).itemsize)
