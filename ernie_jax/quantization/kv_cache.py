"""KV-cache quantization: each cached key / value vector (one token of one kv head, D channels) stored as
symmetric integer codes with its own scale, optionally after a randomised Hadamard rotation (`hadamard`).

Per token and head: scale = max |x| over D / qmax (qmax 127 for int8, 7 for int4), codes = round(x / scale)
clipped to [-qmax, qmax], read back as codes * scale; the round trip is within scale / 2 of x per element.
The scale is computed when a token is written and never changes, so rows and positions are independent
(continuous batching, speculative rollback overwrite entries freely). Scales are fp32 (4 bytes beside the D
or D/2 bytes of codes): the error bound above then holds exactly, with no rounding of the scale itself.

int4 codes are packed two per byte along D ([..., D/2] uint8, the even channel in the low nibble), so the
cache arrays' bytes are the memory the scheme takes.

Rotation (`KVCacheConfig.hadamard`): K and V vectors are stored rotated (R x) and queries are rotated alike at
read time, so the scores are unchanged in exact arithmetic; the attention output, a mix of rotated values, is
rotated back (Rᵀ o). V is rotated as well as K because its per-token scale suffers from outlier channels in
the same way, and the inverse costs one [D, D] product of the few new queries' outputs per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ernie_jax.quantization import hadamard

BITS = (None, 8, 4)
SCALE_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """How the inference engine stores its KV cache (hashable: part of the compiled functions' keys).

    bits: None (the compute dtype, as without this option), 8 (int8 codes) or 4 (int4, two per byte).
    hadamard: rotate K and V by the randomised Hadamard rotation of `seed` before storing them (the head
      dimension must be a power of two); with bits None it changes nothing but rounding.
    """

    bits: int | None = None
    hadamard: bool = False
    seed: int = 0

    def __post_init__(self):
        if not (self.bits is None or (type(self.bits) in (int, np.int64, np.int32) and self.bits in BITS)):
            raise ValueError(f"KVCacheConfig bits must be one of {BITS}, got bits={self.bits!r}")
        if not isinstance(self.hadamard, (bool, np.bool_)):
            raise ValueError(f"KVCacheConfig hadamard must be a bool, got hadamard={self.hadamard!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"KVCacheConfig seed must be an int >= 0, got seed={self.seed!r}")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def check(self, head_dim: int) -> None:
        """Raises ValueError when this scheme cannot store heads of `head_dim` channels."""
        if self.hadamard:
            try:
                hadamard.check_dim(head_dim)
            except ValueError as e:
                raise ValueError(f"kv_cache={self}: {e}") from None
        if self.bits == 4 and head_dim % 2:
            raise ValueError(f"kv_cache={self}: int4 codes pack two per byte, head_dim must be even, got {head_dim}")


def resolve(kv_cache: KVCacheConfig | None, head_dim: int) -> KVCacheConfig:
    """The user-facing `kv_cache` option (`Engine`, `generate`) -> a checked scheme (None: the default)."""
    if kv_cache is None:
        return KVCacheConfig()
    if not isinstance(kv_cache, KVCacheConfig):
        raise ValueError(f"kv_cache must be a KVCacheConfig or None, got {type(kv_cache).__name__} {kv_cache!r}")
    kv_cache.check(head_dim)
    return kv_cache


@struct.dataclass
class QuantizedKV:
    """Quantized cache entries: codes [..., D] int8 (bits 8) or [..., D/2] uint8 (bits 4), scale [...] fp32
    (one per token per head; the cache's leading axes, e.g. [L, B, Hkv, T])."""

    codes: jax.Array
    scale: jax.Array
    bits: int = struct.field(pytree_node=False, default=8)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def pack_int4(codes: jax.Array) -> jax.Array:
    """int8 codes in [-8, 7] [..., D] (D even) -> [..., D/2] uint8: channel 2i in the low nibble, 2i+1 high."""
    nib = codes.astype(jnp.uint8) & 0xF  # two's complement: the low 4 bits of the int8
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """[..., D/2] uint8 -> int8 codes [..., D]."""
    lo, hi = packed & 0xF, packed >> 4
    signed = lambda n: (n.astype(jnp.int8) ^ 8) - 8  # noqa: E731  4-bit two's complement -> int8
    out = jnp.stack([signed(lo), signed(hi)], axis=-1)
    return out.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def quantize(x: jax.Array, bits: int) -> QuantizedKV:
    """x [..., D] -> codes and one scale per vector (max |x| over D / qmax; an all-zero vector: scale 0)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / qmax(bits)
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    codes = jnp.clip(jnp.round(xf / safe), -qmax(bits), qmax(bits)).astype(jnp.int8)
    return QuantizedKV(pack_int4(codes) if bits == 4 else codes, scale.astype(SCALE_DTYPE), bits)


def dequantize(q: QuantizedKV, dtype) -> jax.Array:
    """-> [..., D] codes * scale in `dtype`."""
    codes = unpack_int4(q.codes) if q.bits == 4 else q.codes
    return (codes.astype(jnp.float32) * q.scale[..., None].astype(jnp.float32)).astype(dtype)


def empty(shape: tuple[int, ...], dtype, config: KVCacheConfig) -> jax.Array | QuantizedKV:
    """Zeros for entries of `shape` [..., D]: an array in `dtype`, or codes + scales when quantized."""
    if not config.quantized:
        return jnp.zeros(shape, dtype)
    d = shape[-1] // 2 if config.bits == 4 else shape[-1]
    return QuantizedKV(jnp.zeros(shape[:-1] + (d,), jnp.uint8 if config.bits == 4 else jnp.int8),
                       jnp.zeros(shape[:-1], SCALE_DTYPE), config.bits)


def encode(x: jax.Array, config: KVCacheConfig, dtype) -> jax.Array | QuantizedKV:
    """New keys or values x [..., D] -> what the cache stores: rotated (hadamard) and quantized (bits), or x in
    the cache's `dtype`."""
    if config.hadamard:
        x = hadamard.rotate(x, config.seed, out_dtype=jnp.float32)  # quantized from the fp32 accumulator
    return quantize(x, config.bits) if config.quantized else x.astype(dtype)


def read(stored: jax.Array | QuantizedKV, dtype) -> jax.Array:
    """Stored entries -> [..., D]: dequantized to `dtype`, or the unquantized array as stored (still rotated
    when the scheme rotates)."""
    return dequantize(stored, dtype) if isinstance(stored, QuantizedKV) else stored


def write(stored: jax.Array | QuantizedKV, at: tuple, x: jax.Array, config: KVCacheConfig,
          mode: str | None = None) -> jax.Array | QuantizedKV:
    """Encodes new entries x [..., D] and sets them at index `at` of the stored entries (`at` indexes the
    axes before D, so it selects the same entries of the codes and of the scales)."""
    new = encode(x, config, None if isinstance(stored, QuantizedKV) else stored.dtype)
    return jax.tree.map(lambda dst, src: dst.at[at].set(src.astype(dst.dtype), mode=mode), stored, new)


def entry_bytes(head_dim: int, dtype, bits: int | None) -> int:
    """Bytes one key or value vector (one token, one kv head) takes in the cache."""
    if bits not in BITS:
        raise ValueError(f"kv_bits must be one of {BITS}, got kv_bits={bits!r}")
    if bits is None:
        return head_dim * jnp.dtype(dtype).itemsize
    return head_dim * bits // 8 + jnp.dtype(SCALE_DTYPE).itemsize
