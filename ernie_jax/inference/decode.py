"""The model's forward passes with a KV cache: prefill of right-padded prompts, decode of new tokens, and the
MTP depths' passes used for speculative drafts. Pure functions of a merged model (call them inside `jax.jit`).

Positions: a row's prompt tokens sit at cache positions 0..P-1 (right padding: no real token attends to it);
the token at cache position n has RoPE position n + delta, delta = 0 for text and, for VL prompts (whose
generated tokens are text with t = h = w), the last prompt token's position + 1 - prompt tokens: decoding
continues from the last prompt token, as transformers' `generate` does (`position_ids[..., -1:] + 1`). That
equals transformers' rope_deltas (max position + 1 - prompt tokens) except under mrope rule "hf" after a video
whose temporal extent reaches past the text after it (`mrope` module doc), where rope_deltas would be larger.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ernie_jax.inference.cache import KVCache
from ernie_jax.model.attention import LayerCache
from ernie_jax.model.mrope import mrope_angles
from ernie_jax.model.rope import rope_angles

VL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")


def _angles(model, positions: jax.Array) -> jax.Array:
    """[B, S] text positions -> RoPE angles [B, S, D/2] (equal to the 3D angles with t = h = w)."""
    c = model.config
    return rope_angles(positions, c.head_dim, c.rope_theta)


def prefill(model, ids: jax.Array, lengths: jax.Array, mm: dict[str, Any] | None = None) -> dict[str, Any]:
    """ids [B, P] right-padded prompts of `lengths` [B] tokens -> dict with
    logits [B, V] (fp32, at each row's last prompt token), hidden [B, P, H] (before the final norm), k / v
    (per stack [L, B, Hkv, P, D]), angles [B, P, D/2] and delta [B] int32.

    mm (VL prompts): the processor's arrays for the padded batch (`VL_INPUTS` + `moe_mm_token_type_ids`)."""
    c = model.config
    b, p = ids.shape
    caches = tuple(LayerCache() for _ in model.decoder.stacks)
    modality = None
    if mm:
        valid = jnp.arange(p)[None, :] < lengths[:, None]
        x, position_ids, _ = model.embed_inputs(ids, attention_mask=valid,
                                                **{k: mm[k] for k in VL_INPUTS if k in mm})
        angles = mrope_angles(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        last = jnp.take_along_axis(position_ids[0], (lengths - 1)[:, None], axis=1)[:, 0]  # t row (text: t=h=w)
        delta = (last + 1 - lengths).astype(jnp.int32)
        modality = mm.get("moe_mm_token_type_ids")
    else:
        x = model._embed(ids)
        angles = _angles(model, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)))
        delta = jnp.zeros((b,), jnp.int32)
    logits, hidden, caches = model.forward_cached(x, angles, caches, modality=modality)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return dict(logits=last, hidden=hidden, k=tuple(lc.k for lc in caches), v=tuple(lc.v for lc in caches),
                angles=angles, delta=delta)


def decode(model, ids: jax.Array, index: jax.Array, delta: jax.Array, cache: KVCache,
           layer_states: tuple | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """ids [B, S] new tokens at cache positions index[b] .. index[b] + S - 1 -> (fp32 logits [B, S, V],
    hidden [B, S, H] before the final norm, the cache with their keys written). The index does not move.
    layer_states: the decoder's layers unstacked (`Decoder.unstack_layers`), or None (scanned)."""
    s = ids.shape[1]
    angles = _angles(model, index[:, None] + delta[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :])
    caches = tuple(LayerCache(k, v, index, scheme=cache.scheme) for k, v in zip(cache.k, cache.v))
    logits, hidden, caches = model.forward_cached(model._embed(ids), angles, caches, layer_states=layer_states)
    return logits, hidden, cache.replace(k=tuple(lc.k for lc in caches), v=tuple(lc.v for lc in caches))


def mtp_prefill(model, ids: jax.Array, hidden: jax.Array, angles: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first MTP depth over a prompt: ids [B, P] (each position's next token), hidden [B, P, H] (the main
    model's, before the final norm), angles [B, P, D/2] -> (fp32 logits [B, P, V], k, v [B, Hkv, P, D])."""
    logits, _, lc = model.mtp_cached(0, ids, hidden, angles, LayerCache())
    return logits, lc.k, lc.v


def mtp_decode(model, ids: jax.Array, hidden: jax.Array, index: jax.Array, delta: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The first MTP depth at cache positions index[b] .. + S - 1: ids [B, S] (each position's next token),
    hidden [B, S, H] -> (fp32 logits [B, S, V], the cache with the depth's keys written)."""
    s = ids.shape[1]
    angles = _angles(model, index[:, None] + delta[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :])
    lc = LayerCache(cache.mtp_k[0], cache.mtp_v[0], index, scheme=cache.scheme)
    logits, _, lc = model.mtp_cached(0, ids, hidden, angles, lc)
    return logits, cache.replace(mtp_k=(lc.k,) + cache.mtp_k[1:], mtp_v=(lc.v,) + cache.mtp_v[1:])
