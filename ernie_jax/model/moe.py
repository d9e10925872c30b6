"""Mixture-of-experts FFN block of ERNIE-4.5: top-k router, routed SwiGLU experts, shared experts.

Three interchangeable dispatch paths (`ErnieConfig.moe_dispatch`), equal whenever nothing is dropped:
- `dropless` (default): replicate each token k times, sort the token-slots by expert, the experts' SwiGLU
  on the sorted rows (`grouped_matmul.expert_swiglu`: fused on one layout for `bucketed`, three
  `grouped_matmul` calls otherwise), unsort, weighted combine. The sort is a permutation whose gradient is
  the inverse permutation (a gather, no scatter-add).
- `capacity`: GShard einsum dispatch/combine with `moe_capacity_factor`; slots past an expert's capacity are
  dropped (first choices of every token win over second choices). The fallback and an oracle.
- `dense`: every expert on every token, weighted by the (mostly zero) routing matrix. The plain oracle.
The block also returns `MoEStats`, the per-layer sums the router losses and load balancing need.
On a mesh with an `expert` axis > 1 the dropless path runs expert-parallel (`expert_parallel`).

VL models (ERNIE-4.5-VL, `config.vision` set) isolate modalities: every MoE layer holds a text pool
(`router`, `experts`) and a vision pool (`vision_router`, `vision_experts`, its own width), each with its own
fp32 router and correction bias; a token is routed by the pool of its `moe_mm_token_type_ids` (0 text,
1/2 image/video placeholders and their start/end tokens) and only through it; shared experts see every
token. Each pool runs the same dispatch on all token slots with the other modality's slots sent to the
out-of-range expert id E: sorted last, outside every group, they cost the grouped matmul nothing and come
out zero (the capacity and dense paths drop them through `one_hot(E) == 0`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from ernie_jax.config import ErnieConfig
from ernie_jax.model.expert_parallel import dropless_expert_parallel, expert_parallel_plan
from ernie_jax.model.grouped_matmul import expert_swiglu
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

    @property
    def quantized(self) -> bool:
        """Whether the weights are quantized (`ernie_jax.quantization.quantized_weight`): inference only, on
        the `dropless` and `gathered` paths."""
        return not isinstance(self.wi_gate[...], jax.Array)

    def dropless(self, x: jax.Array, r: Routing, *, impl: str, tile: int) -> jax.Array:
        """x [T, H] -> [T, H]."""
        t, k = r.expert_ids.shape
        e = self.wi_gate.shape[0]
        wg, wu, wo = self.weights(x.dtype)
        flat = r.expert_ids.reshape(-1)  # slot s = token s // k, choice s % k
        order, inverse = sort_permutation(flat)
        sizes = jnp.bincount(flat, length=e)
        xs = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [T*k, H] sorted by expert
        if self.quantized:  # the weights' own grouped matmuls (a Pallas kernel on TPU)
            act = ACTIVATIONS[self.act]
            hid = act(wg.grouped_matmul(xs, sizes)) * wu.grouped_matmul(xs, sizes)
            ys = wo.grouped_matmul(hid, sizes)
        else:
            ys = expert_swiglu(xs, wg, wu, wo, sizes, act=ACTIVATIONS[self.act], impl=impl, tile=tile)
        y = permute_rows(ys, inverse, order).reshape(t, k, -1)
        y = jnp.where((r.expert_ids < e)[..., None], y, 0)  # slots of the other modality (id E): no rows
        return jnp.einsum("TKH,TK->TH", y, r.weights.astype(y.dtype))

    def gathered(self, x: jax.Array, r: Routing) -> jax.Array:
        """Each token through the weights of its own k experts, gathered: x [T, H] -> [T, H]. Reads T*k
        experts' weights and sorts nothing: the cheapest exact path when T*k is small against E (decoding)."""
        e = self.wi_gate.shape[0]
        wg, wu, wo = self.weights(x.dtype)
        ids = jnp.minimum(r.expert_ids, e - 1)  # the other modality's id E carries weight 0
        if self.quantized:  # gather the chosen experts' codes, then dequantize only those
            xin = wg.inputs(x)
            g, u, o = (w.take(ids).dequantize() for w in (wg, wu, wo))
            hid = ACTIVATIONS[self.act](jnp.einsum("TH,TKHI->TKI", xin, g)) * jnp.einsum("TH,TKHI->TKI", xin, u)
            out = jnp.einsum("TKI,TKIH->TKH", wo.inputs(hid), o)
            return jnp.einsum("TKH,TK->TH", out, r.weights.astype(out.dtype))
        hid = (ACTIVATIONS[self.act](jnp.einsum("TH,TKHI->TKI", x, wg[ids]))
               * jnp.einsum("TH,TKHI->TKI", x, wu[ids]))
        out = jnp.einsum("TKI,TKIH->TKH", hid, wo[ids])
        return jnp.einsum("TKH,TK->TH", out, r.weights.astype(out.dtype))

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


def isolate(r: Routing, member: jax.Array) -> Routing:
    """Routing restricted to the tokens of one modality (member [T] bool): the others' slots go to the
    out-of-range expert id E with weight 0, so every dispatch path leaves them out."""
    e = r.probs.shape[-1]
    return r.replace(expert_ids=jnp.where(member[:, None], r.expert_ids, e),
                     weights=jnp.where(member[:, None], r.weights, 0).astype(r.weights.dtype))


class MoEBlock(nnx.Module):
    """Router + routed experts (+ shared experts, one SwiGLU of width I * n_shared on every token); VL
    configs add the vision pool `vision_router` + `vision_experts` (module docstring)."""

    def __init__(self, config: ErnieConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = jnp.dtype(c.param_dtype)
        width = c.moe_intermediate_size[0]
        pool = lambda w: (Router(c.hidden_size, c.moe_num_experts, c.moe_k, norm_min=c.moe_norm_min,  # noqa: E731
                                 std=c.initializer_range, rngs=rngs),
                          Experts(c.moe_num_experts, c.hidden_size, w, act=c.hidden_act,
                                  std=c.initializer_range, param_dtype=pd, rngs=rngs))
        self.router, self.experts = pool(width)
        if c.vision is not None:
            self.vision_router, self.vision_experts = pool(c.moe_intermediate_size[1])
        if c.moe_num_shared_experts:
            self.shared = MLP(c.hidden_size, width * c.moe_num_shared_experts, act=c.hidden_act,
                              use_bias=c.use_bias, std=c.initializer_range, param_dtype=pd, rngs=rngs)

    def _routed(self, router: Router, experts: Experts, xt: jax.Array, member: jax.Array | None,
                token_mask: jax.Array | None, few_tokens: bool = False) -> tuple[jax.Array, MoEStats]:
        """One pool on xt [T, H]; member [T] bool restricts it to one modality (None: every token).
        few_tokens (decoding): gather the chosen experts' weights when that reads fewer weights than all E."""
        c = self.config
        r = router(xt)
        mask = member if token_mask is None else token_mask if member is None else token_mask & member
        stats = router_stats(r, mask)
        if member is not None:
            r = isolate(r, member)
        plan = expert_parallel_plan(c.moe_num_experts, xt.shape[0]) if c.moe_dispatch == "dropless" else None
        if few_tokens and xt.shape[0] * c.moe_k <= c.moe_num_experts:
            y = experts.gathered(xt, r)
        elif experts.quantized:  # inference: exact dropless dispatch on the weights' grouped matmuls
            if plan is not None:
                raise ValueError("quantized experts do not run expert-parallel (the mesh's `expert` axis > 1); "
                                 "decode the quantized model with expert=1")
            y = experts.dropless(xt, r, impl=c.moe_gmm_impl, tile=c.moe_gmm_tile)
        elif plan is not None:  # experts split over the `expert` mesh axis, all-to-all token exchange
            y = dropless_expert_parallel(xt, r, *experts.weights(xt.dtype), plan=plan,
                                         act=ACTIVATIONS[experts.act], impl=c.moe_gmm_impl, tile=c.moe_gmm_tile)
        elif c.moe_dispatch == "dropless":
            y = experts.dropless(xt, r, impl=c.moe_gmm_impl, tile=c.moe_gmm_tile)
        elif c.moe_dispatch == "capacity":
            y = experts.capacity(xt, r, capacity_factor=c.moe_capacity_factor)
        else:
            y = experts.dense(xt, r)
        return y, stats

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 modality: jax.Array | None = None, few_tokens: bool = False) -> tuple[jax.Array, MoEStats]:
        """x [B, S, H], token_mask [B, S] bool (real tokens, for the statistics), modality [B, S] int
        (VL: `moe_mm_token_type_ids`, > 0 = vision pool; None = all text) -> ([B, S, H], MoEStats).

        The statistics of a VL block have a leading modality axis [2] (text, vision)."""
        b, s, h = x.shape
        xt = x.reshape(b * s, h)
        tm = None if token_mask is None else token_mask.reshape(-1)
        if not hasattr(self, "vision_router"):
            y, stats = self._routed(self.router, self.experts, xt, None, tm, few_tokens)
        else:
            vision = jnp.zeros((b * s,), bool) if modality is None else modality.reshape(-1) > 0
            y, text_stats = self._routed(self.router, self.experts, xt, ~vision, tm, few_tokens)
            if modality is None:  # pure text (or decoding): the vision pool sees no token
                vision_stats = jax.tree.map(jnp.zeros_like, text_stats)
            else:
                y_v, vision_stats = self._routed(self.vision_router, self.vision_experts, xt, vision, tm, few_tokens)
                y = y + y_v
            stats = jax.tree.map(lambda a, v: jnp.stack([a, v]), text_stats, vision_stats)
        y = y.reshape(b, s, h).astype(x.dtype)
        if hasattr(self, "shared"):
            y = y + self.shared(x)
        return checkpoint_name(shard(y, ("act_batch", "act_length", "act_embed")), "mlp_out"), stats
