"""Mixture-of-experts FFN block of ERNIE-4.5: top-k router, routed SwiGLU experts, shared experts.

Three interchangeable dispatch paths (`ErnieConfig.moe_dispatch`), equal whenever nothing is dropped:
- `dropless` (default): replicate each token k times, sort the token-slots by expert, grouped matmul
  (`gmm.grouped_matmul`), unsort, weighted combine. The sort is a permutation whose gradient is the
  inverse permutation (a gather, no scatter-add).
- `capacity`: GShard einsum dispatch/combine with `moe_capacity_factor`; slots past an expert's capacity are
  dropped (first choices of every token win over second choices). The fallback and an oracle.
- `dense`: every expert on every token, weighted by the (mostly zero) routing matrix. The plain oracle.
The block also returns `MoEStats`, the per-layer sums the router losses and load balancing need.
On a mesh with an `expert` axis > 1 the dropless path runs expert-parallel (`expert_parallel`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.config import ErnieConfig
from ernie_jax.model.expert_parallel import dropless_expert_parallel, expert_parallel_plan
from ernie_jax.model.gmm import grouped_matmul
from ernie_jax.model.mlp import ACTIVATIONS, MLP
from ernie_jax.model.params import normal_param
from ernie_jax.model.permute import permute_rows, sort_permutation
from ernie_jax.model.router import Router, Routing
from ernie_jax.sharding import shard


@struct.dataclass
class MoEStats:
    """Per-layer router statistics over the real (unmasked) tokens; a leading layer axis when stacked."""

    topk_count: jax.Array  # [E] slots per expert under plain top-k of probs (no bias): HF's aux-loss counts
    prob_sum: jax.Array  # [E] sum over tokens of the router probabilities
    num_tokens: jax.Array  # [] number of real tokens
    z_sum: jax.Array  # [] sum over tokens of logsumexp(logits)^2
    usage: jax.Array  # [E] slots routed per expert (selection with the correction bias, before capacity drops)


class Experts(nnx.Module):
    """E SwiGLU experts: wi_gate / wi_up [E, H, I], wo [E, I, H]."""

    def __init__(self, num_experts: int, hidden: int, width: int, *, act: str, std: float, param_dtype,
                 rngs: nnx.Rngs):
        self.act = act
        e, h, i = num_experts, hidden, width
        self.wi_gate = normal_param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), std=std, dtype=param_dtype)
        self.wi_up = normal_param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), std=std, dtype=param_dtype)
        self.wo = normal_param(rngs, (e, i, h), ("expert", "moe_mlp", "embed"), std=std, dtype=param_dtype)

    def weights(self, dt):
        return self.wi_gate[...].astype(dt), self.wi_up[...].astype(dt), self.wo[...].astype(dt)

    def dropless(self, x: jax.Array, r: Routing, *, impl: str, tile: int) -> jax.Array:
        """x [T, H] -> [T, H]."""
        t, k = r.expert_ids.shape
        e = self.wi_gate.shape[0]
        wg, wu, wo = self.weights(x.dtype)
        flat = r.expert_ids.reshape(-1)  # slot s = token s // k, choice s % k
        order, inverse = sort_permutation(flat)
        sizes = jnp.bincount(flat, length=e)
        xs = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [T*k, H] sorted by expert
        gate = grouped_matmul(xs, wg, sizes, impl=impl, tile=tile)
        up = grouped_matmul(xs, wu, sizes, impl=impl, tile=tile)
        h = checkpoint_name(ACTIVATIONS[self.act](gate) * up, "moe_hidden")
        ys = grouped_matmul(h, wo, sizes, impl=impl, tile=tile)
        y = permute_rows(ys, inverse, order).reshape(t, k, -1)
        return jnp.einsum("TKH,TK->TH", y, r.weights.astype(y.dtype))

    def capacity(self, x: jax.Array, r: Routing, *, capacity_factor: float) -> jax.Array:
        """GShard dispatch with capacity C = ceil(cf * T * k / E); x [T, H] -> [T, H]."""
        t, k = r.expert_ids.shape
        e = self.wi_gate.shape[0]
        cap = max(1, math.ceil(capacity_factor * t * k / e))
        wg, wu, wo = self.weights(x.dtype)
        onehot = jax.nn.one_hot(r.expert_ids, e, dtype=jnp.int32)  # [T, k, E]
        # position of each slot in its expert's queue: all first choices (in token order), then second ...
        pos = jnp.cumsum(onehot.transpose(1, 0, 2).reshape(k * t, e), axis=0).reshape(k, t, e).transpose(1, 0, 2)
        pos = pos * onehot - 1
        dispatch = (onehot > 0) & (pos < cap)
        d = jax.nn.one_hot(jnp.where(dispatch, pos, -1), cap, dtype=x.dtype)  # [T, k, E, C]
        xin = jnp.einsum("TKEC,TH->ECH", d, x)
        hid = ACTIVATIONS[self.act](jnp.einsum("ECH,EHI->ECI", xin, wg)) * jnp.einsum("ECH,EHI->ECI", xin, wu)
        out = jnp.einsum("ECI,EIH->ECH", hid, wo)
        return jnp.einsum("TKEC,TK,ECH->TH", d, r.weights.astype(x.dtype), out)

    def dense(self, x: jax.Array, r: Routing) -> jax.Array:
        """Every expert on every token; x [T, H] -> [T, H]."""
        e = self.wi_gate.shape[0]
        wg, wu, wo = self.weights(x.dtype)
        hid = ACTIVATIONS[self.act](jnp.einsum("TH,EHI->ETI", x, wg)) * jnp.einsum("TH,EHI->ETI", x, wu)
        out = jnp.einsum("ETI,EIH->ETH", hid, wo)
        combine = jnp.einsum("TK,TKE->TE", r.weights, jax.nn.one_hot(r.expert_ids, e, dtype=r.weights.dtype))
        return jnp.einsum("TE,ETH->TH", combine, out)


def router_stats(r: Routing, token_mask: jax.Array | None) -> MoEStats:
    """Masked sums over tokens; token_mask [T] bool or None (all real)."""
    t, e = r.probs.shape
    k = r.expert_ids.shape[1]
    m = jnp.ones((t,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    _, plain = jax.lax.top_k(r.probs, k)  # HF's aux loss ignores the correction bias
    counts = lambda ids: jnp.einsum("T,TKE->E", m, jax.nn.one_hot(ids, e, dtype=jnp.float32))  # noqa: E731
    lse = jax.nn.logsumexp(r.logits, axis=-1)
    return MoEStats(topk_count=counts(plain), prob_sum=jnp.einsum("T,TE->E", m, r.probs), num_tokens=m.sum(),
                    z_sum=jnp.sum(m * lse ** 2), usage=jax.lax.stop_gradient(counts(r.expert_ids)))


class MoEBlock(nnx.Module):
    """Router + routed experts (+ shared experts, one SwiGLU of width I * n_shared on every token)."""

    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = jnp.dtype(c.param_dtype)
        width = c.moe_intermediate_size[0]
        self.router = Router(c.hidden_size, c.moe_num_experts, c.moe_k, norm_min=c.moe_norm_min,
                             std=c.initializer_range, rngs=rngs)
        self.experts = Experts(c.moe_num_experts, c.hidden_size, width, act=c.hidden_act,
                               std=c.initializer_range, param_dtype=pd, rngs=rngs)
        if c.moe_num_shared_experts:
            self.shared = MLP(c.hidden_size, width * c.moe_num_shared_experts, act=c.hidden_act,
                              use_bias=c.use_bias, std=c.initializer_range, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
        """x [B, S, H], token_mask [B, S] bool (real tokens, for the statistics) -> ([B, S, H], MoEStats)."""
        c = self.config
        b, s, h = x.shape
        xt = x.reshape(b * s, h)
        r = self.router(xt)
        plan = expert_parallel_plan(c.moe_num_experts, b * s) if c.moe_dispatch == "dropless" else None
        if plan is not None:  # experts split over the `expert` mesh axis, all-to-all token exchange
            y = dropless_expert_parallel(xt, r, *self.experts.weights(xt.dtype), plan=plan,
                                         act=ACTIVATIONS[self.experts.act], impl=c.moe_gmm_impl, tile=c.moe_gmm_tile)
        elif c.moe_dispatch == "dropless":
            y = self.experts.dropless(xt, r, impl=c.moe_gmm_impl, tile=c.moe_gmm_tile)
        elif c.moe_dispatch == "capacity":
            y = self.experts.capacity(xt, r, capacity_factor=c.moe_capacity_factor)
        else:
            y = self.experts.dense(xt, r)
        y = y.reshape(b, s, h).astype(x.dtype)
        if c.moe_num_shared_experts:
            y = y + self.shared(x)
        stats = router_stats(r, None if token_mask is None else token_mask.reshape(-1))
        return checkpoint_name(shard(y, ("act_batch", "act_length", "act_embed")), "mlp_out"), stats
