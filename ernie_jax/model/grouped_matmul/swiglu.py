"""`expert_swiglu`: the routed experts' SwiGLU on rows sorted by expert, fused on the `bucketed` layout.

Fused = grouped_matmul(act(grouped_matmul(x, wg)) * grouped_matmul(x, wu), wo) on one layout: the branch's
maps are built once, x goes into the buckets and tiles once, gate, up, the activation and the down projection
stay in the layout and only y comes back to the sorted rows (three grouped_matmul calls build, gather and
ungather the layout three times in the forward and again in the backward). Gate and up are two matmuls on the
same layout rather than one against [wg | wu]: concatenating the weights (and splitting their gradient) copies
all E experts' weights every step, a cost that grows with E. The residuals are gate and up in sorted-row order
(the backward regathers them rather than recompute the matmuls). XLA:CPU may run the gate and up matmuls
concurrently; it drops `optimization_barrier`s, so they cannot be ordered from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.model.grouped_matmul.bucketed import (bmm, bucket_branch, bucket_branches, bucket_layout,
                                                     fallback_tile, weight_grad)
from ernie_jax.model.grouped_matmul.impl import grouped_matmul, on_platform
from ernie_jax.model.grouped_matmul.tiled import tiled
from ernie_jax.model.grouped_matmul.varying import all_varying, sum_to


def _pairs(f, *pairs):
    """f on the buckets of every (buckets, tiles) pair, and on the tiles (None when there are none)."""
    b = f(*(p[0] for p in pairs))
    return b, None if pairs[0][1] is None else f(*(p[1] for p in pairs))


def _swiglu_bucket_fwd(c: int, n: int, t: int, act, res: bool, x, wg, wu, wo, sizes):
    lay = bucket_layout(sizes, x.shape[0], c, n, t)
    tg, dt = lay.tile_group, x.dtype
    xl = lay.to(x)
    gate = _pairs(lambda a: a.astype(dt), bmm("GCK,GKN->GCN", *xl, wg, tg))
    up = _pairs(lambda a: a.astype(dt), bmm("GCK,GKN->GCN", *xl, wu, tg))
    h = _pairs(lambda a, b: act(a) * b, gate, up)
    y = lay.back(*bmm("GCI,GIH->GCH", *h, wo, tg)).astype(dt)
    return (y, lay.back(*gate), lay.back(*up)) if res else y


def _swiglu_bucket_bwd(c: int, n: int, t: int, act, x, wg, wu, wo, sizes, gate, up, dy):
    lay = bucket_layout(sizes, x.shape[0], c, n, t)
    tg, dt = lay.tile_group, x.dtype
    xl, dyl, up = lay.to(x), lay.to(dy), lay.to(up)  # zero on padding rows
    a, act_vjp = zip(*(jax.vjp(act, g) if g is not None else (None, None) for g in lay.to(gate)))
    h = _pairs(lambda a, b: a * b, a, up)
    dh = _pairs(lambda a: a.astype(dt), bmm("GCH,GIH->GCI", *dyl, wo, tg))
    dwo = weight_grad(lay, *h, *dyl)
    dgate = _pairs(lambda f, d, u: f(d * u)[0], act_vjp, dh, up)
    dup = _pairs(lambda d, a: d * a, dh, a)
    dwg = weight_grad(lay, *xl, *dgate)
    dx = bmm("GCN,GKN->GCK", *dgate, wg, tg)
    dwu = weight_grad(lay, *xl, *dup)
    dx = _pairs(lambda a, b: a + b, dx, bmm("GCN,GKN->GCK", *dup, wu, tg))
    return lay.back(*dx).astype(dt), dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwo.astype(wo.dtype)


def _swiglu_unfused(impl: str, tile: int, act, x, wg, wu, wo, sizes):
    """The three grouped_matmul calls (every impl but `bucketed`; the fused path's fallback with `tiled`)."""
    gate = grouped_matmul(x, wg, sizes, impl=impl, tile=tile)
    up = grouped_matmul(x, wu, sizes, impl=impl, tile=tile)
    h = checkpoint_name(act(gate) * up, "moe_hidden")
    return grouped_matmul(h, wo, sizes, impl=impl, tile=tile)


def _swiglu_fallback_fwd(tile: int, act, res: bool, x, wg, wu, wo, sizes):
    gate, up = (tiled(x, w, sizes, tile).astype(x.dtype) for w in (wg, wu))
    y = tiled(act(gate) * up, wo, sizes, tile).astype(x.dtype)
    return (y, gate, up) if res else y


def _swiglu_fallback_bwd(tile: int, act, x, wg, wu, wo, sizes, gate, up, dy):
    del gate, up  # recomputed: the fallback is for rare, heavily skewed loads
    _, vjp = jax.vjp(lambda *w: _swiglu_unfused("tiled", tile, act, *w, sizes), x, wg, wu, wo)
    return vjp(dy)


def _swiglu_forward(res: bool, x, wg, wu, wo, sizes, act, branches, tile):
    """The forward switch: y, or (y, gate, up) when res (the residuals for the backward)."""
    fns = ([functools.partial(_swiglu_bucket_fwd, *b, act, res) for b in branches]
           + [functools.partial(_swiglu_fallback_fwd, tile, act, res)])
    return jax.lax.switch(bucket_branch(sizes, branches), fns, *all_varying(x, wg, wu, wo, sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _swiglu_bucketed(x, wg, wu, wo, sizes, act, branches, tile):
    """The fused `bucketed` expert SwiGLU; sizes int32. Forward: one switch returning y; backward: a second
    switch on the same index (as in `bucketed`), each branch regathering x, dy and (gate | up)."""
    return _swiglu_forward(False, x, wg, wu, wo, sizes, act, branches, tile)


def _swiglu_bucketed_fwd(x, wg, wu, wo, sizes, act, branches, tile):
    y, gate, up = _swiglu_forward(True, x, wg, wu, wo, sizes, act, branches, tile)
    return y, (x, wg, wu, wo, sizes, gate, up)


def _swiglu_bucketed_bwd(act, branches, tile, res, dy):
    x, wg, wu, wo, sizes, gate, up = res
    fns = ([functools.partial(_swiglu_bucket_bwd, *b, act) for b in branches]
           + [functools.partial(_swiglu_fallback_bwd, tile, act)])
    grads = jax.lax.switch(bucket_branch(sizes, branches), fns, *all_varying(x, wg, wu, wo, sizes, gate, up, dy))
    return (*(sum_to(d, p) for d, p in zip(grads, (x, wg, wu, wo))), None)


_swiglu_bucketed.defvjp(_swiglu_bucketed_fwd, _swiglu_bucketed_bwd)


def expert_swiglu(x: jax.Array, wg: jax.Array, wu: jax.Array, wo: jax.Array, group_sizes: jax.Array, *, act,
                  impl: str = "auto", tile: int = 0, fused: bool = True) -> jax.Array:
    """The routed experts' SwiGLU on rows sorted by expert: x [M, K], wg / wu [G, K, I], wo [G, I, K],
    group_sizes [G] -> act(x @ wg[g]) * (x @ wu[g]) @ wo[g] per group's rows, [M, K] in x's dtype (rows past
    sum(group_sizes) zero). `bucketed` (and `auto` off TPU) runs fused on one layout (module docstring) unless
    `fused=False`; the other impls are three `grouped_matmul` calls."""
    if impl == "auto":
        return on_platform(functools.partial(expert_swiglu, act=act, tile=tile, fused=fused), x, wg, wu, wo,
                           group_sizes)
    if impl != "bucketed" or not fused:
        return _swiglu_unfused(impl, tile, act, x, wg, wu, wo, group_sizes)
    m, g = x.shape[0], wg.shape[0]
    return _swiglu_bucketed(x, wg, wu, wo, group_sizes.astype(jnp.int32), act, bucket_branches(m, g),
                            fallback_tile(m, g, tile))
