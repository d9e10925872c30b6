"""Attention: one entry point `attention(q, k, v, mask)` behind which implementations plug in, and the
GQA self-attention layer of the ERNIE-4.5 LM (q/k/v/o projections + interleaved RoPE).

The mask is described, not materialised: `AttentionMask` holds causality, packed-sequence segment ids
and a key padding mask. The XLA implementation builds the dense [B, 1, Sq, Sk] boolean from it; the
FlashMask kernel ("flashmask") turns the same description into per-column row bounds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ernie_jax.config import ErnieConfig
from ernie_jax.model.dense import dense
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.model.rope import apply_interleaved_rope
from ernie_jax.quantization import hadamard, kv_cache as kvq
from ernie_jax.sharding import current_rules, logical_to_spec, resolve_rules, shard


@struct.dataclass
class AttentionMask:
    """Which keys each query may see.

    causal: query i sees key j only if j <= i + (Sk - Sq) (queries are the last Sq of Sk positions).
    q_segment_ids / kv_segment_ids: [B, Sq] / [B, Sk] int; a query sees only keys of its own segment
      (packed documents). Both or neither.
    kv_valid: [B, Sk] bool; False marks padding keys (transformers' `attention_mask`).
    kv_visible_until: [B, Sk] int; key j is hidden from the query rows at positions >= kv_visible_until[j]
      (FlashMask's lower-triangle end column): the shared-question mask of DPO rows, where the rejected reply
      does not see the chosen one before it (`posttrain.preference_pipeline`).
    A query row that sees no key at all gets zero attention output, never NaN.
    """

    causal: bool = struct.field(pytree_node=False, default=True)
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    kv_valid: jax.Array | None = None
    kv_visible_until: jax.Array | None = None

    def dense(self, sq: int, sk: int) -> jax.Array:
        """The boolean mask [B or 1, 1, Sq, Sk] (True = attend)."""
        m = jnp.ones((1, 1, sq, sk), bool)
        if self.causal:
            m = m & (jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :])[None, None]
        if self.q_segment_ids is not None:
            m = m & (self.q_segment_ids[:, None, :, None] == self.kv_segment_ids[:, None, None, :])
        if self.kv_valid is not None:
            m = m & self.kv_valid.astype(bool)[:, None, None, :]
        if self.kv_visible_until is not None:
            m = m & ((jnp.arange(sq) + (sk - sq))[:, None] < self.kv_visible_until[:, None, None, :])
        return m

    def every_query_sees_a_key(self, sq: int, sk: int) -> bool:
        """True when no query row can be fully masked, known from the static structure alone (plain
        causal, queries the last Sq of Sk >= Sq positions: query i sees at least key i + Sk - Sq)."""
        return (self.causal and self.q_segment_ids is None and self.kv_valid is None
                and self.kv_visible_until is None and sk >= sq)


# Causal attention over at least this many queries runs as this many query blocks: block i needs only the
# keys up to its last query, 5/8 of the score and value work (docs/benchmarks.md, design measurements).
_CAUSAL_BLOCKS = 4
_MIN_BLOCKED_QUERIES = 128


def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """Plain-JAX attention, the oracle of every fast path: fp32 scores and softmax, GQA by grouping.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]. Query head h uses kv head h // (Hq/Hkv), as
    transformers' repeat_kv does. Causal attention skips the key blocks past each query block's end
    (`_CAUSAL_BLOCKS`); the skipped keys are masked for all its queries, so the result is the same.
    """
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Sk, D]
    allowed = mask.dense(sq, sk)
    never_empty = mask.every_query_sees_a_key(sq, sk)
    blocked = mask.causal and sk >= sq >= _MIN_BLOCKED_QUERIES and sq % _CAUSAL_BLOCKS == 0
    if not blocked:
        return _grouped_attention(q, kh, vh, allowed, scale, never_empty)
    bq = sq // _CAUSAL_BLOCKS
    outs = []
    for i in range(_CAUSAL_BLOCKS):
        rows, end = slice(i * bq, (i + 1) * bq), sk - sq + (i + 1) * bq  # queries are the last Sq positions
        outs.append(_grouped_attention(q[:, rows], kh[:, :, :end], vh[:, :, :end], allowed[:, :, rows, :end],
                                       scale, never_empty))
    return jnp.concatenate(outs, axis=1)


def _grouped_attention(q, kh, vh, allowed, scale: float, never_empty: bool) -> jax.Array:
    """q [B, Sq, Hq, D], kh/vh [B, Hkv, Sk, D], allowed [B or 1, 1, Sq, Sk] -> [B, Sq, Hq, D].

    Heads go first and the G query heads of a kv head are stacked along the rows ([B, Hkv, G*Sq, D]): both
    products are then plain batched matmuls (batch dims leading, one contraction), which XLA:CPU runs
    without the transposes a [B, Sq, Hkv, G, D] layout costs."""
    b, sq, hq, d = q.shape
    hkv, sk = kh.shape[1], kh.shape[2]
    g = hq // hkv
    qh = q.reshape(b, sq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    scores = jnp.einsum("BKMD,BKSD->BKMS", qh, kh, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, hkv, g, sq, sk)
    allowed = allowed[:, :, None]  # [B, 1, 1, Sq, Sk]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if not never_empty:
        probs = jnp.where(allowed, probs, 0.0)  # rows with no visible key: zeros, not a uniform average
    probs = probs.reshape(b, hkv, g * sq, sk).astype(vh.dtype)
    out = jnp.einsum("BKMS,BKSD->BKMD", probs, vh, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, sq, d).transpose(0, 3, 1, 2, 4).reshape(b, sq, hq, d).astype(q.dtype)


def _jax_nn_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU when shapes allow; XLA elsewhere)."""
    allowed = mask.dense(q.shape[1], k.shape[1])
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=scale)
    visible = jnp.any(allowed, axis=-1)[:, 0, :, None, None]  # [B, Sq, 1, 1]
    return jnp.where(visible, out, 0).astype(q.dtype)


def flashmask_indices(mask: AttentionMask, sq: int, sk: int, batch: int) -> jax.Array:
    """`AttentionMask` -> FlashMask `startend_row_indices` [B, 1, Sk, 1 (causal) or 2 (not causal)].

    Segments must be contiguous runs (packed documents): key j is then visible to rows up to the end of
    its run (causal: [LTS] = run end) and, non-causal, from the start of its run ([LTS, UTE] = [end, start]).
    Padding keys (kv_valid False) are masked for every row; `kv_visible_until` lowers a key's run end. Requires
    Sq == Sk (self-attention)."""
    from pallas_kernels.flashmask.masks import segment_bounds

    if mask.q_segment_ids is not None:
        start, end = segment_bounds(mask.q_segment_ids)
    else:
        start = jnp.zeros((batch, sk), jnp.int32)
        end = jnp.full((batch, sk), sq, jnp.int32)
    if mask.kv_visible_until is not None:
        end = jnp.minimum(end, mask.kv_visible_until.astype(end.dtype))
    if mask.kv_valid is not None:
        valid = mask.kv_valid.astype(bool)
        end = jnp.where(valid, end, 0)
        start = jnp.where(valid, start, sq)
    cols = (end,) if mask.causal else (end, start)
    return jnp.stack(cols, axis=-1)[:, None].astype(jnp.int32)


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def flashmask_partition_specs(q_shape, kv_shape, mesh_shape, rules):
    """PartitionSpecs (q, k/v, startend_row_indices) of the FlashMask kernel's `jax.shard_map` over the whole
    mesh, from the logical rules of the activations (`act_batch`, `act_heads`); also the output's (= q's).

    * batch: the `act_batch` axes of q (k/v, the indices and the output get the same ones);
    * sequence: never split, whatever `act_length` says (the shard_map gathers it on entry);
    * head_dim: never split (the scores contract over it);
    * heads: the `act_heads` axes of q; k/v get the same axes so that every shard holds the kv heads of its
      query heads (contiguous split: query head h uses kv head h // (Hq/Hkv)). If those axes do not divide
      the kv heads: with one kv head (MQA) k/v stay replicated (every query head uses it); otherwise both q
      and k/v take the `act_heads` axes that divide the kv heads (possibly none: heads replicated).
    The indices [B, 1, Sk, n] are split over the batch axes only."""
    b, s, hq, d = q_shape
    hkv = kv_shape[2]
    q_spec = logical_to_spec(("act_batch", None, "act_heads", None), (b, s, hq, d), mesh_shape, rules)
    batch, heads = _spec_axes(q_spec[0]), _spec_axes(q_spec[2])
    n_heads = math.prod(mesh_shape[a] for a in heads)
    if hkv % n_heads == 0:
        kv_heads = heads
    elif hkv == 1:
        kv_heads = ()
    else:
        heads = kv_heads = _spec_axes(
            logical_to_spec(("act_batch", None, "act_heads", None), (b, s, hkv, d), mesh_shape, rules)[2])
    bt = _spec_entry(batch)
    return (P(bt, None, _spec_entry(heads), None), P(bt, None, _spec_entry(kv_heads), None),
            P(bt, None, None, None))


def _flashmask_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """The FlashMask Pallas kernel (pallas_kernels.flashmask): the Mosaic kernel when lowered for TPU, the
    Pallas interpreter elsewhere. Self-attention only (Sq == Sk); otherwise (decoding with a cache) the XLA
    path.

    Under a mesh of more than one device (all axes `AxisType.Auto`, e.g. `ernie_jax.sharding.activate`) the
    kernel runs inside a `jax.shard_map` over the whole mesh (a Mosaic kernel cannot be auto-partitioned):
    batch and heads split as the activation rules say, sequence and head_dim whole
    (`flashmask_partition_specs`). Inside another shard_map (Manual axes) it is called directly."""
    from pallas_kernels.flashmask import flashmask_attention

    b, sq = q.shape[:2]
    sk = k.shape[1]
    if sq != sk:
        return _xla_attention(q, k, v, mask, scale)
    idx = flashmask_indices(mask, sq, sk, b)
    kernel = functools.partial(flashmask_attention, causal=mask.causal, scale=scale, interpret=None)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not mesh.are_all_axes_auto:
        return kernel(q, k, v, idx)
    shape = dict(mesh.shape)
    q_spec, kv_spec, idx_spec = flashmask_partition_specs(q.shape, k.shape, shape, current_rules()
                                                          or resolve_rules("dp"))
    # check_vma=False: interpret=None traces the Pallas interpreter branch too, and the interpreter fails
    # jax's varying-axes check inside shard_map. Without the check, the transpose divides the output
    # cotangent by, and psums the input cotangents over, the mesh axes a spec leaves out - exact here
    # (replicated k/v of MQA under split query heads: the per-shard partial dk/dv are summed).
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, idx_spec), out_specs=q_spec,
                       check_vma=False)
    return fn(q, k, v, idx)


@struct.dataclass
class LayerCache:
    """One attention layer's KV cache during inference.

    k, v: [B, Hkv, T, D] in the compute dtype, heads before positions so that decoding reads them as the
      batched matmul operands of `_grouped_attention` without a transpose; `None` at prefill (the layer then
      attends over the fresh keys and hands them back for the caller to store).
    index: [B] int32, the number of positions already in each row's cache: the S new tokens of row b are
      written at index[b] .. index[b] + S - 1 and query i sees keys 0 .. index[b] + i. Rows move independently
      (continuous batching, speculative rollback): entries past a row's index are stale and never seen.
    layer: None, or a layer index when k / v are a whole scanned stack's [L, B, Hkv, T, D] (carried through
      the layer scan: the new tokens are scattered into the stack's buffer in place and the layer reads its
      slice, instead of the scan slicing the stack into inputs and stacking a copy of it as outputs).
    scheme: how k / v are stored (`ernie_jax.quantization.kv_cache`): quantized, k / v are `QuantizedKV`
      (codes [B, Hkv, T, D or D/2] + scales [B, Hkv, T]; the stack layout with a leading L); with the
      Hadamard rotation, k / v hold rotated entries, the queries are rotated at `attend` and the output
      rotated back.
    """

    k: jax.Array | kvq.QuantizedKV | None = None
    v: jax.Array | kvq.QuantizedKV | None = None
    index: jax.Array | None = None
    layer: jax.Array | None = None
    scheme: kvq.KVCacheConfig = struct.field(pytree_node=False, default=kvq.KVCacheConfig())

    def append(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        """Writes new keys / values k, v [B, S, Hkv, D] at each row's index (the index does not move)."""
        b, s = k.shape[:2]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
        pos = self.index[:, None] + jnp.arange(s)[None, :]  # [B, S]
        at = (rows, slice(None), pos) if self.layer is None else (self.layer, rows, slice(None), pos)
        return self.replace(k=kvq.write(self.k, at, k, self.scheme), v=kvq.write(self.v, at, v, self.scheme))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q [B, S, Hq, D] (the tokens just appended) over the cache -> [B, S, Hq, D]."""
        k, v = self.k, self.v
        if self.layer is not None:
            k, v = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False), (k, v))
        k, v = kvq.read(k, q.dtype), kvq.read(v, q.dtype)  # dequantized [B, Hkv, T, D]
        names = ("act_batch", "act_kv_heads", None, "act_head_dim")
        k, v = shard(k, names), shard(v, names)
        s, t = q.shape[1], k.shape[2]
        last = self.index[:, None] + jnp.arange(s)[None, :]  # [B, S]: the last key each query sees
        allowed = jnp.arange(t)[None, None, None, :] <= last[:, None, :, None]
        rotated = self.scheme.hadamard  # k, v stored as R k, R v: (R q)·(R k) = q·k; Rᵀ sum_t p_t R v_t = o
        o = _grouped_attention(hadamard.rotate(q, self.scheme.seed) if rotated else q, k, v, allowed, scale,
                               never_empty=True)
        return hadamard.unrotate(o, self.scheme.seed) if rotated else o


_IMPLS = {"xla": _xla_attention, "jax_nn": _jax_nn_attention, "flashmask": _flashmask_attention}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, scale: float | None = None,
              impl: str = "xla") -> jax.Array:
    """Masked multi-head attention with GQA. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {sorted(_IMPLS)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _IMPLS[impl](q, k, v, mask, scale)


class Attention(nnx.Module):
    """GQA self-attention of one decoder layer. Weights: wq [H, Nq, D], wk/wv [H, Nkv, D], wo [Nq, D, H]."""

    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd, std = jnp.dtype(c.param_dtype), c.initializer_range
        h, nq, nkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.wq = normal_param(rngs, (h, nq, d), ("embed", "heads", "head_dim"), std=std, dtype=pd)
        self.wk = normal_param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wv = normal_param(rngs, (h, nkv, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
        self.wo = normal_param(rngs, (nq, d, h), ("heads", "head_dim", "embed"), std=std, dtype=pd)
        if c.use_bias:
            self.bq = const_param(0.0, (nq, d), ("heads", "head_dim"), dtype=pd)
            self.bk = const_param(0.0, (nkv, d), ("kv_heads", "head_dim"), dtype=pd)
            self.bv = const_param(0.0, (nkv, d), ("kv_heads", "head_dim"), dtype=pd)
            self.bo = const_param(0.0, (h,), ("embed",), dtype=pd)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """x [B, S, H], angles [B, S, D/2] -> [B, S, H].

        With a `cache` (inference) -> ([B, S, H], cache): at prefill (`cache.k` None) the mask applies to the
        fresh keys, which come back in the cache layout; otherwise the new keys are appended at the rows'
        indices and the queries attend over the cache (`mask` unused)."""
        c = self.config
        dt = x.dtype
        q = dense(x, self.wq[...].astype(dt))
        k = dense(x, self.wk[...].astype(dt))
        v = dense(x, self.wv[...].astype(dt))
        if c.use_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        q = checkpoint_name(shard(q, ("act_batch", "act_length", "act_heads", "act_head_dim")), "query_proj")
        k = checkpoint_name(shard(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim")), "key_proj")
        v = checkpoint_name(shard(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim")), "value_proj")
        q, k = apply_interleaved_rope(q, angles), apply_interleaved_rope(k, angles)
        if cache is not None and cache.k is not None:
            cache = cache.append(k, v)
            o = cache.attend(q, c.head_dim ** -0.5)
        else:
            o = attention(q, k, v, mask, scale=c.head_dim ** -0.5, impl=c.attention_impl)
            if cache is not None:
                cache = cache.replace(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3))
        o = checkpoint_name(shard(o, ("act_batch", "act_length", "act_heads", "act_head_dim")), "attention_out")
        out = dense(o, self.wo[...].astype(dt), n_in=2)
        if c.use_bias:
            out = out + self.bo[...].astype(dt)
        out = checkpoint_name(shard(out, ("act_batch", "act_length", "act_embed")), "out_proj")
        return out if cache is None else (out, cache)
