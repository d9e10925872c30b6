"""Attention: one entry point `attention(q, k, v, mask)` behind which implementations plug in, and the
GQA self-attention layer of the ERNIE-4.5 LM (q/k/v/o projections + interleaved RoPE).

The mask is described, not materialised: `AttentionMask` holds causality, packed-sequence segment ids
and a key padding mask. The XLA implementation builds the dense [B, 1, Sq, Sk] boolean from it; the
FlashMask kernel ("flashmask") turns the same description into per-column row bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.config import ErnieConfig
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.model.rope import apply_interleaved_rope
from ernie_jax.sharding import shard


@struct.dataclass
class AttentionMask:
    """Which keys each query may see.

    causal: query i sees key j only if j <= i + (Sk - Sq) (queries are the last Sq of Sk positions).
    q_segment_ids / kv_segment_ids: [B, Sq] / [B, Sk] int; a query sees only keys of its own segment
      (packed documents). Both or neither.
    kv_valid: [B, Sk] bool; False marks padding keys (transformers' `attention_mask`).
    A query row that sees no key at all gets zero attention output, never NaN.
    """

    causal: bool = struct.field(pytree_node=False, default=True)
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    kv_valid: jax.Array | None = None

    def dense(self, sq: int, sk: int) -> jax.Array:
        """The boolean mask [B or 1, 1, Sq, Sk] (True = attend)."""
        m = jnp.ones((1, 1, sq, sk), bool)
        if self.causal:
            m = m & (jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :])[None, None]
        if self.q_segment_ids is not None:
            m = m & (self.q_segment_ids[:, None, :, None] == self.kv_segment_ids[:, None, None, :])
        if self.kv_valid is not None:
            m = m & self.kv_valid.astype(bool)[:, None, None, :]
        return m


def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """Plain-JAX attention, the oracle of every fast path: fp32 scores and softmax, GQA by grouping.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]. Query head h uses kv head h // (Hq/Hkv), as
    transformers' repeat_kv does.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, sq, hkv, g, d)
    scores = jnp.einsum("BQKGD,BSKD->BKGQS", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = mask.dense(sq, sk)[:, :, None]  # [B, 1, 1, Sq, Sk]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(allowed, probs, 0.0)  # rows with no visible key: zeros, not a uniform average
    out = jnp.einsum("BKGQS,BSKD->BQKGD", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, sq, hq, d).astype(q.dtype)


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
    Padding keys (kv_valid False) are masked for every row. Requires Sq == Sk (self-attention)."""
    from pallas_kernels.flashmask.masks import segment_bounds

    if mask.q_segment_ids is not None:
        start, end = segment_bounds(mask.q_segment_ids)
    else:
        start = jnp.zeros((batch, sk), jnp.int32)
        end = jnp.full((batch, sk), sq, jnp.int32)
    if mask.kv_valid is not None:
        valid = mask.kv_valid.astype(bool)
        end = jnp.where(valid, end, 0)
        start = jnp.where(valid, start, sq)
    cols = (end,) if mask.causal else (end, start)
    return jnp.stack(cols, axis=-1)[:, None].astype(jnp.int32)


def _flashmask_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    """The FlashMask Pallas kernel (pallas_kernels.flashmask): the Mosaic kernel when lowered for TPU, the
    Pallas interpreter elsewhere. Self-attention only (Sq == Sk); otherwise (decoding with a cache) the XLA
    path."""
    from pallas_kernels.flashmask import flashmask_attention

    b, sq = q.shape[:2]
    sk = k.shape[1]
    if sq != sk:
        return _xla_attention(q, k, v, mask, scale)
    idx = flashmask_indices(mask, sq, sk, b)
    return flashmask_attention(q, k, v, idx, causal=mask.causal, scale=scale, interpret=None)


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

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask) -> jax.Array:
        """x [B, S, H], angles [B, S, D/2] -> [B, S, H]."""
        c = self.config
        dt = x.dtype
        q = jnp.einsum("BSH,HND->BSND", x, self.wq[...].astype(dt))
        k = jnp.einsum("BSH,HND->BSND", x, self.wk[...].astype(dt))
        v = jnp.einsum("BSH,HND->BSND", x, self.wv[...].astype(dt))
        if c.use_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        q = checkpoint_name(shard(q, ("act_batch", "act_length", "act_heads", "act_head_dim")), "query_proj")
        k = checkpoint_name(shard(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim")), "key_proj")
        v = checkpoint_name(shard(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim")), "value_proj")
        q, k = apply_interleaved_rope(q, angles), apply_interleaved_rope(k, angles)
        o = attention(q, k, v, mask, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        o = checkpoint_name(shard(o, ("act_batch", "act_length", "act_heads", "act_head_dim")), "attention_out")
        out = jnp.einsum("BSND,NDH->BSH", o, self.wo[...].astype(dt))
        if c.use_bias:
            out = out + self.bo[...].astype(dt)
        return checkpoint_name(shard(out, ("act_batch", "act_length", "act_embed")), "out_proj")
