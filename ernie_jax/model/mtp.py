"""Multi-token prediction (MTP) block of ERNIE-4.5 (training definition, architecture doc §7).

Depth d (1-based) predicts the token d + 1 positions ahead: with `e_d` the embedding of the input shifted
left by d and `h_{d-1}` the previous depth's hidden state (depth 0: the last decoder layer's output,
before the final norm), `h_d = Layer_d(Linear_{2H->H}(cat[RMSNorm_emb(e_d), RMSNorm_hid(h_{d-1})]))`, a
full attention layer with a dense MLP. Every depth's output goes through the model's shared final norm
and LM head. transformers drops these weights; Baidu's checkpoints (21B, 300B) carry them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.model.attention import AttentionMask, LayerCache
from ernie_jax.model.decoder import DecoderLayer
from ernie_jax.model.dense import dense
from ernie_jax.model.norm import RMSNorm
from ernie_jax.model.params import normal_param


class MTPDepth(nnx.Module):
    """One depth: emb_norm, hidden_norm [H], proj [2H, H] (embedding half first), a dense decoder layer."""

    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.emb_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.hidden_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.proj = normal_param(rngs, (2 * c.hidden_size, c.hidden_size), ("mlp", "embed"),
                                 std=c.initializer_range, dtype=pd)
        self.layer = DecoderLayer(c, "dense", rngs=rngs)

    def __call__(self, emb: jax.Array, h: jax.Array, angles: jax.Array, mask: AttentionMask,
                 cache: LayerCache | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
        """emb, h [B, S, H] -> h_d [B, S, H] (before the shared final norm); with a `cache` (inference,
        `Attention`) -> (h_d, cache)."""
        u = jnp.concatenate([self.emb_norm(emb), self.hidden_norm(h)], axis=-1)
        u = dense(u, self.proj[...].astype(u.dtype))
        if cache is None:
            return self.layer(u, angles, mask)[0]
        out, _, cache = self.layer(u, angles, mask, cache=cache)
        return out, cache


def mtp_inputs(input_ids: jax.Array, depth: int, fill: int = 0) -> jax.Array:
    """[B, S] -> [D, B, S]: depth d (1-based) sees the input shifted left by d, the last d positions `fill`.
    Its logits at position p predict token p + 1 + d, i.e. the main targets shifted left by d."""
    b, s = input_ids.shape
    pad = jnp.full((b, depth), fill, input_ids.dtype)
    padded = jnp.concatenate([input_ids, pad], axis=1)
    return jnp.stack([padded[:, d:d + s] for d in range(1, depth + 1)])


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None,
                depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets [D, B, S] and loss masks [D, B, S] of the MTP depths: depth d predicts `targets[p + d]`,
    supervised only where that position is supervised and (packed rows) in the same document as p."""
    b, s = targets.shape
    seg = jnp.zeros_like(targets) if segment_ids is None else segment_ids
    pad = lambda a: jnp.concatenate([a, jnp.zeros((b, depth), a.dtype)], axis=1)  # noqa: E731
    t, m, g = pad(targets), pad(loss_mask.astype(bool)), pad(seg)
    tgt = jnp.stack([t[:, d:d + s] for d in range(1, depth + 1)])
    msk = jnp.stack([m[:, d:d + s] & (g[:, d:d + s] == seg) & (jnp.arange(s) + d < s) for d in range(1, depth + 1)])
    return tgt, msk
