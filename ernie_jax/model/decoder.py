"""Decoder layers and the scanned layer stacks.

A layer is pre-norm: `x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))`, with a dense SwiGLU FFN or (MoE
models, `ErnieConfig.is_moe_layer`) a mixture of experts. Consecutive layers of the same kind form one
stack whose parameters carry a leading `layers` axis and which runs under `jax.lax.scan`: compile time
depends on the number of stacks (1 dense; 2 for 21B/300B: dense-first, then MoE), not on depth.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import ErnieConfig
from ernie_jax.model.attention import Attention, AttentionMask, LayerCache
from ernie_jax.model.mlp import MLP
from ernie_jax.model.moe import MoEBlock, MoEStats
from ernie_jax.model.norm import RMSNorm
from ernie_jax.model.remat import remat
from ernie_jax.sharding import logical_axes


class DecoderLayer(nnx.Module):
    def __init__(self, config: ErnieConfig, kind: str, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.kind = kind
        self.input_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        self.attn = Attention(c, rngs=rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=pd)
        if kind == "dense":
            self.mlp = MLP(c.hidden_size, c.intermediate_size, act=c.hidden_act, use_bias=c.use_bias,
                           std=c.initializer_range, param_dtype=pd, rngs=rngs)
        elif kind == "moe":
            self.mlp = MoEBlock(c, rngs=rngs)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask,
                 token_mask: jax.Array | None = None, modality: jax.Array | None = None,
                 cache: LayerCache | None = None) -> tuple:
        """x [B, S, H] -> ([B, S, H], router statistics of a MoE layer or None), plus the updated cache when
        one is given (inference, `Attention`). modality [B, S]: the VL routing type ids (`MoEBlock`)."""
        if cache is None:
            x = x + self.attn(self.input_norm(x), angles, mask)
        else:
            a, cache = self.attn(self.input_norm(x), angles, mask, cache)
            x = x + a
        if self.kind == "moe":
            # decoding a few tokens (cache given, not prefill): the cheapest exact dispatch for small counts
            y, stats = self.mlp(self.post_attn_norm(x), token_mask, modality,
                                few_tokens=cache is not None and cache.k is not None)
            x = x + y
        else:
            x, stats = x + self.mlp(self.post_attn_norm(x)), None
        return (x, stats) if cache is None else (x, stats, cache)


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of `make(rngs)` as one module whose variables have a leading
    axis of size n, logically named `layers`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(params=key))))(keys)
    state = jax.tree.map(lambda v: v.replace(logical_axes=("layers",) + logical_axes(v)), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, state)


class LayerStack(nnx.Module):
    """`n` decoder layers of one kind, run with `jax.lax.scan` (and `jax.checkpoint` per remat policy)."""

    def __init__(self, config: ErnieConfig, kind: str, n: int, *, rngs: nnx.Rngs):
        self.kind, self.num_layers, self.remat_policy = kind, n, config.remat_policy
        self.layers = stack_modules(lambda r: DecoderLayer(config, kind, rngs=r), n, rngs)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask,
                 token_mask: jax.Array | None = None, modality: jax.Array | None = None,
                 cache: LayerCache | None = None, layer_states: tuple | None = None) -> tuple:
        """-> (x, MoEStats with a leading [n] layer axis, or None for dense stacks), plus the stack's cache
        (k / v with a leading [n] layer axis, one index for all layers) when `cache` is given.

        layer_states (decode only): the n layers' variables as separate arrays (`unstack_layers`, made once
        outside the compiled step): the layers then run unrolled on them, where the scan would copy every
        layer's weights out of the stack at every step (memory traffic that dominates a decode step on CPU)."""
        graphdef, state = nnx.split(self.layers)
        if cache is not None and cache.k is None:  # prefill: the layers hand back their fresh keys, stacked
            def prefill_body(h, layer_state):
                h, stats, lc = nnx.merge(graphdef, layer_state)(h, angles, mask, token_mask, modality, LayerCache())
                return h, (stats, lc.k, lc.v)

            x, (stats, k, v) = jax.lax.scan(prefill_body, x, state)
            return x, stats, cache.replace(k=k, v=v)
        if cache is not None and layer_states is not None:
            k, v = cache.k, cache.v
            stats = []
            for i, layer_state in enumerate(layer_states):
                x, st, lc = nnx.merge(graphdef, layer_state)(x, angles, mask, token_mask, modality,
                                                             cache.replace(k=k, v=v, layer=i))
                k, v = lc.k, lc.v
                stats.append(st)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats[0] is not None else None
            return x, stats, cache.replace(k=k, v=v)
        if cache is not None:  # decode: the stack's cache rides in the carry, updated in place
            def decode_body(carry, xs):
                h, k, v = carry
                layer_state, i = xs
                h, stats, lc = nnx.merge(graphdef, layer_state)(h, angles, mask, token_mask, modality,
                                                                cache.replace(k=k, v=v, layer=i))
                return (h, lc.k, lc.v), stats

            (x, k, v), stats = jax.lax.scan(decode_body, (x, cache.k, cache.v),
                                            (state, jnp.arange(self.num_layers)))
            return x, stats, cache.replace(k=k, v=v)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, angles, mask, token_mask, modality)

        # Short stacks (the CPU / test configs) are unrolled: no stacked residuals written with
        # dynamic-update-slice into zero-initialised buffers; deep ones stay a loop, which compiles faster
        # (docs/benchmarks.md, design measurements).
        return jax.lax.scan(remat(body, self.remat_policy), x, state, unroll=self.num_layers <= 4)


def layer_segments(config: ErnieConfig) -> list[tuple[str, int]]:
    """Runs of consecutive layers of the same kind: [(kind, count), ...] in depth order (a run also ends at
    each of `config.layer_stack_breaks`)."""
    segs: list[tuple[str, int]] = []
    for i in range(config.num_hidden_layers):
        kind = "moe" if config.is_moe_layer(i) else "dense"
        if segs and segs[-1][0] == kind and i not in config.layer_stack_breaks:
            segs[-1] = (kind, segs[-1][1] + 1)
        else:
            segs.append((kind, 1))
    return segs


class Decoder(nnx.Module):
    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        self.stacks = nnx.List([LayerStack(config, kind, n, rngs=rngs) for kind, n in layer_segments(config)])

    def unstack_layers(self) -> tuple:
        """Per stack, a tuple of its layers' variables sliced out of the stack (copies, made once): the
        `layer_states` of an unrolled decode step."""
        return tuple(tuple(jax.tree.map(lambda a: a[i], nnx.state(stack.layers)) for i in range(stack.num_layers))
                     for stack in self.stacks)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: AttentionMask,
                 token_mask: jax.Array | None = None, modality: jax.Array | None = None,
                 caches: tuple[LayerCache, ...] | None = None, layer_states: tuple | None = None) -> tuple:
        """-> (x, MoEStats stacked over all MoE layers in depth order, or None), plus the stacks' caches
        (one `LayerCache` per stack) when `caches` are given. layer_states: per stack, see `LayerStack`."""
        stats, new_caches = [], []
        for i, stack in enumerate(self.stacks):
            if caches is None:
                x, st = stack(x, angles, mask, token_mask, modality)
            else:
                x, st, c = stack(x, angles, mask, token_mask, modality, caches[i],
                                 None if layer_states is None else layer_states[i])
                new_caches.append(c)
            if st is not None:
                stats.append(st)
        stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
        return (x, stats) if caches is None else (x, stats, tuple(new_caches))
