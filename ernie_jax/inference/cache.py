"""The KV cache: preallocated, static shapes, one k / v pair per scanned decoder stack (and per MTP depth).

Layout `[L, B, Hkv, T, D]` per stack (MTP depths `[B, Hkv, T, D]`): a layer's slice `[B, Hkv, T, D]` is what
the decode attention multiplies without a transpose (`LayerCache.attend` stacks a kv head's query heads on
the rows: a batched matmul with batch dims B, Hkv leading); K / V are stored once per kv head (GQA / MQA are
never repeated in memory). Arrays are in the compute dtype and carry logical names (`layers`, `act_batch`,
`act_kv_heads`, -, `act_head_dim`), so under a mesh they shard like the activations: batch over data / fsdp,
kv heads over tensor. The number of positions each row holds (`index`) lives with the engine's slot state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ernie_jax.config import ErnieConfig
from ernie_jax.model.decoder import layer_segments
from ernie_jax.sharding import shard

STACK_AXES = ("layers", "act_batch", "act_kv_heads", None, "act_head_dim")
DEPTH_AXES = STACK_AXES[1:]


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per decoder stack [L, B, Hkv, T, D]
    v: tuple[jax.Array, ...]
    mtp_k: tuple[jax.Array, ...] = ()  # per MTP depth [B, Hkv, T, D] (speculative decoding)
    mtp_v: tuple[jax.Array, ...] = ()


def init_cache(config: ErnieConfig, batch: int, length: int, *, mtp_depths: int = 0) -> KVCache:
    """Zeros for `batch` rows of `length` positions (call inside `jax.jit` under a mesh to get them sharded)."""
    c = config
    dt = jnp.dtype(c.dtype)
    row = (batch, c.num_key_value_heads, length, c.head_dim)
    stacks = [shard(jnp.zeros((n,) + row, dt), STACK_AXES) for _, n in layer_segments(c)]
    depths = [shard(jnp.zeros(row, dt), DEPTH_AXES) for _ in range(mtp_depths)]
    return KVCache(k=tuple(stacks), v=tuple(jnp.zeros_like(a) for a in stacks), mtp_k=tuple(depths),
                   mtp_v=tuple(jnp.zeros_like(a) for a in depths))


def bytes_per_token(config: ErnieConfig, *, mtp_depths: int = 0) -> int:
    """Cache bytes one position of one row takes: K and V of every layer (and MTP depth)."""
    c = config
    layers = c.num_hidden_layers + mtp_depths
    return 2 * layers * c.num_key_value_heads * c.head_dim * jnp.dtype(c.dtype).itemsize


def insert(cache: KVCache, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], mtp_k: tuple[jax.Array, ...],
           mtp_v: tuple[jax.Array, ...], slots: jax.Array) -> KVCache:
    """Writes prefilled rows into the cache's slots: k / v per stack [L, m, Hkv, P, D] (MTP per depth
    [m, Hkv, P, D]) go to positions 0..P-1 of rows `slots` [m] int32; a slot index >= the batch is dropped
    (padding rows of the prefill batch)."""
    def put(dst, src, axis):
        idx = (slice(None),) * axis + (slots, slice(None), slice(0, src.shape[axis + 2]))
        return dst.at[idx].set(src.astype(dst.dtype), mode="drop")

    return KVCache(k=tuple(put(d, s, 1) for d, s in zip(cache.k, k)),
                   v=tuple(put(d, s, 1) for d, s in zip(cache.v, v)),
                   mtp_k=tuple(put(d, s, 0) for d, s in zip(cache.mtp_k, mtp_k)),
                   mtp_v=tuple(put(d, s, 0) for d, s in zip(cache.mtp_v, mtp_v)))
