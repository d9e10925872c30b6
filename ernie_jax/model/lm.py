"""`ErnieForCausalLM`: embedding -> scanned decoder stacks -> final RMSNorm -> LM head.

Exact transformers `Ernie4_5ForCausalLM` semantics: no embedding scaling, no logit soft-cap, the head is
tied to the embedding when `tie_word_embeddings`. Logits come out in fp32 (the head matmul accumulates in
fp32), which the loss wants anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.config import ErnieConfig
from ernie_jax.model.attention import AttentionMask, LayerCache
from ernie_jax.model.decoder import Decoder
from ernie_jax.model.dense import dense
from ernie_jax.model.moe import MoEStats
from ernie_jax.model.mtp import MTPDepth
from ernie_jax.model.norm import RMSNorm
from ernie_jax.model.params import const_param, normal_param
from ernie_jax.model.rope import rope_angles
from ernie_jax.sharding import shard


@struct.dataclass
class CausalLMOutput:
    logits: jax.Array  # [B, S, V] fp32
    hidden_states: jax.Array  # [B, S, H] after the final norm
    moe_stats: MoEStats | None = None  # router statistics, leading axis = MoE layers in depth order
    mtp_logits: jax.Array | None = None  # [D, B, S, V] fp32: depth d predicts the token d + 1 ahead


class ErnieForCausalLM(nnx.Module):
    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = jnp.dtype(c.param_dtype)
        self.embed = normal_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                                  std=c.initializer_range, dtype=pd)
        self.decoder = Decoder(c, rngs=rngs)
        self.final_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        if not c.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                                        std=c.initializer_range, dtype=pd)
        if c.num_nextn_predict_layers:
            self.mtp = nnx.List([MTPDepth(c, rngs=rngs) for _ in range(c.num_nextn_predict_layers)])
        if c.model_type == "ernie4_5_moe" and c.use_bias:  # transformers' MoE head is Linear(bias=use_bias)
            self.lm_head_bias = const_param(0.0, (c.vocab_size,), ("vocab",), dtype=pd)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 mtp_input_ids: jax.Array | None = None, kv_visible_until: jax.Array | None = None
                 ) -> CausalLMOutput:
        """input_ids [B, S] int.

        positions [B, S]: RoPE positions (default 0..S-1; restart per document for packed rows).
        segment_ids [B, S]: packed-document ids; tokens attend only within their segment.
        attention_mask [B, S]: 1 for real tokens, 0 for padding keys (transformers' convention).
        mtp_input_ids [D, B, S]: inputs of the MTP depths (depth d: the sequence shifted left by d, see
          `mtp_inputs`); MTP logits are computed only when given (training), and D must equal the config's.
        kv_visible_until [B, S]: the row from which each key is hidden (`AttentionMask`; DPO's shared prompt).
        """
        c = self.config
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        angles = rope_angles(positions, c.head_dim, c.rope_theta)
        return self._decode(self._embed(input_ids), angles, segment_ids=segment_ids, attention_mask=attention_mask,
                            mtp_input_ids=mtp_input_ids, kv_visible_until=kv_visible_until)

    def _embed(self, ids: jax.Array) -> jax.Array:
        """[B, S] int -> [B, S, H] in the compute dtype."""
        return jnp.take(self.embed[...].astype(jnp.dtype(self.config.dtype)), ids, axis=0)

    def _decode(self, x: jax.Array, angles: jax.Array, *, segment_ids: jax.Array | None,
                attention_mask: jax.Array | None, mtp_input_ids: jax.Array | None = None,
                modality: jax.Array | None = None, kv_visible_until: jax.Array | None = None) -> CausalLMOutput:
        """Input embeddings x [B, S, H] and RoPE angles [B, S, D/2] -> decoder stacks, norm, head (+ MTP).
        modality [B, S]: VL routing type ids for the MoE layers."""
        c = self.config
        b, s, _ = x.shape
        mask = AttentionMask(causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                             kv_valid=None if attention_mask is None else attention_mask.astype(bool),
                             kv_visible_until=kv_visible_until)
        x = shard(x, ("act_batch", "act_length", "act_embed"))
        x, moe_stats = self.decoder(x, angles, mask, mask.kv_valid, modality)  # real tokens: the router statistics
        h = self.final_norm(x)
        mtp_logits = None
        if mtp_input_ids is not None:
            if mtp_input_ids.shape != (c.num_nextn_predict_layers, b, s):
                raise ValueError(f"mtp_input_ids must be [D={c.num_nextn_predict_layers}, {b}, {s}], "
                                 f"got {mtp_input_ids.shape}")
            hd, outs = x, []
            for depth, ids_d in zip(self.mtp, mtp_input_ids):
                hd = depth(self._embed(ids_d), hd, angles, mask)
                outs.append(self._head(self.final_norm(hd)))
            mtp_logits = jnp.stack(outs)
        return CausalLMOutput(logits=self._head(h), hidden_states=h, moe_stats=moe_stats, mtp_logits=mtp_logits)

    def forward_cached(self, x: jax.Array, angles: jax.Array, caches: tuple[LayerCache, ...], *,
                       modality: jax.Array | None = None,
                       layer_states: tuple | None = None) -> tuple[jax.Array, jax.Array, tuple[LayerCache, ...]]:
        """Inference: input embeddings x [B, S, H] and RoPE angles [B, S, D/2] through the decoder with one
        `LayerCache` per stack (prefill: `k` None; decode: the new tokens appended at each row's index) ->
        (fp32 logits [B, S, V], hidden states [B, S, H] before the final norm (the MTP input), caches).
        Prefill is causal over the S tokens; rows may be right-padded (padding is never attended by a real
        token). modality [B, S]: VL routing type ids (None: text). layer_states: decode on unstacked layer
        weights (`Decoder.unstack_layers`)."""
        x = shard(x, ("act_batch", "act_length", "act_embed"))
        x, _, caches = self.decoder(x, angles, AttentionMask(causal=True), None, modality, caches, layer_states)
        return self._head(self.final_norm(x)), x, caches

    def mtp_cached(self, depth: int, ids: jax.Array, h: jax.Array, angles: jax.Array,
                   cache: LayerCache) -> tuple[jax.Array, jax.Array, LayerCache]:
        """MTP depth `depth` (0-based) with its own cache: ids [B, S] (the tokens one ahead of the positions),
        h [B, S, H] the previous depth's hidden states -> (fp32 logits [B, S, V], h_d, cache)."""
        hd, cache = self.mtp[depth](self._embed(ids), h, angles, AttentionMask(causal=True), cache)
        return self._head(self.final_norm(hd)), hd, cache

    def _head(self, h: jax.Array) -> jax.Array:
        """[B, S, H] -> fp32 logits [B, S, V] (the tied embedding or lm_head, plus the MoE head's bias)."""
        c = self.config
        head = self.embed[...].T if c.tie_word_embeddings else self.lm_head[...]
        logits = dense(h, head.astype(h.dtype), preferred_element_type=jnp.float32)  # see model/dense.py
        if hasattr(self, "lm_head_bias"):
            logits = logits + self.lm_head_bias[...].astype(h.dtype)
        return shard(logits, ("act_batch", "act_length", "act_vocab"))
