"""The KV cache: preallocated, static shapes, one k / v pair per scanned decoder stack (and per MTP depth).

Layout `[L, B, Hkv, T, D]` per stack (MTP depths `[B, Hkv, T, D]`): a layer's slice `[B, Hkv, T, D]` is what
the decode attention multiplies without a transpose (`LayerCache.attend` stacks a kv head's query heads on
the rows: a batched matmul with batch dims B, Hkv leading); K / V are stored once per kv head (GQA / MQA are
never repeated in memory). Arrays are in the compute dtype and carry logical names (`layers`, `act_batch`,
`act_kv_heads`, -, `act_head_dim`), so under a mesh they shard like the activations: batch over data / fsdp,
kv heads over tensor. The number of positions each row holds (`index`) lives with the engine's slot state.

Quantized (`KVCacheConfig(bits=8 | 4)`, `ernie_jax.quantization.kv_cache`): each k / v entry is a
`QuantizedKV`, codes `[L, B, Hkv, T, D]` int8 or `[L, B, Hkv, T, D/2]` uint8 (int4, two per byte) with fp32
scales `[L, B, Hkv, T]` named like the codes without the last axis; prefilled rows are quantized as they are
inserted, decoded tokens as they are appended, and the decode attention reads them dequantized. The MTP
depths' caches use the same scheme.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ernie_jax.config import ErnieConfig
from ernie_jax.model.decoder import layer_segments
from ernie_jax.quantization import kv_cache as kvq
from ernie_jax.quantization.kv_cache import KVCacheConfig, QuantizedKV
from ernie_jax.sharding import shard

STACK_AXES = ("layers", "act_batch", "act_kv_heads", None, "act_head_dim")
DEPTH_AXES = STACK_AXES[1:]

Entries = jax.Array | QuantizedKV


@struct.dataclass
class KVCache:
    k: tuple[Entries, ...]  # per decoder stack [L, B, Hkv, T, D]
    v: tuple[Entries, ...]
    mtp_k: tuple[Entries, ...] = ()  # per MTP depth [B, Hkv, T, D] (speculative decoding)
    mtp_v: tuple[Entries, ...] = ()
    scheme: KVCacheConfig = struct.field(pytree_node=False, default=KVCacheConfig())


def _sharded(entries: Entries, axes: tuple) -> Entries:
    if isinstance(entries, QuantizedKV):
        return entries.replace(codes=shard(entries.codes, axes), scale=shard(entries.scale, axes[:-1]))
    return shard(entries, axes)


def init_cache(config: ErnieConfig, batch: int, length: int, *, mtp_depths: int = 0,
               kv_cache: KVCacheConfig | None = None) -> KVCache:
    """Zeros for `batch` rows of `length` positions (call inside `jax.jit` under a mesh to get them sharded).
    kv_cache: how entries are stored (default: the compute dtype, unrotated)."""
    c = config
    scheme = KVCacheConfig() if kv_cache is None else kv_cache
    scheme.check(c.head_dim)
    dt = jnp.dtype(c.dtype)
    row = (batch, c.num_key_value_heads, length, c.head_dim)

    def zeros(shape, axes):
        return _sharded(kvq.empty(shape, dt, scheme), axes)

    stacks = [(n,) + row for _, n in layer_segments(c)]
    return KVCache(k=tuple(zeros(s, STACK_AXES) for s in stacks), v=tuple(zeros(s, STACK_AXES) for s in stacks),
                   mtp_k=tuple(zeros(row, DEPTH_AXES) for _ in range(mtp_depths)),
                   mtp_v=tuple(zeros(row, DEPTH_AXES) for _ in range(mtp_depths)), scheme=scheme)


def bytes_per_token(config: ErnieConfig, *, mtp_depths: int = 0, kv_bits: int | None = None) -> int:
    """Cache bytes one position of one row takes: K and V of every layer (and MTP depth), the scales included
    when quantized (kv_bits 8 or 4)."""
    c = config
    layers = c.num_hidden_layers + mtp_depths
    return 2 * layers * c.num_key_value_heads * kvq.entry_bytes(c.head_dim, c.dtype, kv_bits)


def insert(cache: KVCache, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], mtp_k: tuple[jax.Array, ...],
           mtp_v: tuple[jax.Array, ...], slots: jax.Array) -> KVCache:
    """Writes prefilled rows into the cache's slots: k / v per stack [L, m, Hkv, P, D] (MTP per depth
    [m, Hkv, P, D]) go to positions 0..P-1 of rows `slots` [m] int32, encoded by the cache's scheme; a slot
    index >= the batch is dropped (padding rows of the prefill batch)."""
    def put(dst, src, axis):
        idx = (slice(None),) * axis + (slots, slice(None), slice(0, src.shape[axis + 2]))
        return kvq.write(dst, idx, src, cache.scheme, mode="drop")

    return cache.replace(k=tuple(put(d, s, 1) for d, s in zip(cache.k, k)),
                         v=tuple(put(d, s, 1) for d, s in zip(cache.v, v)),
                         mtp_k=tuple(put(d, s, 0) for d, s in zip(cache.mtp_k, mtp_k)),
                         mtp_v=tuple(put(d, s, 0) for d, s in zip(cache.mtp_v, mtp_v)))
