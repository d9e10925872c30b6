"""Expert parallelism for the dropless MoE path: routed experts split over the `expert` mesh axis.

Used by `MoEBlock` automatically when the current mesh has an `expert` axis of size > 1, the dispatch is
`dropless`, the rules shard the expert weights' leading axis over `expert` and the token batch over (among
others) `expert`, and the sizes divide (`expert_parallel_plan`). Otherwise the plain GSPMD path runs.
To turn it off on such a mesh, map the logical `expert` axis to nothing
(`MeshConfig(rule_overrides=(("expert", None),))`): the expert weights are then replicated and every shard
runs every expert on its own tokens.

Inside one `jax.shard_map` over the whole mesh each shard holds E/ep experts and T/n tokens (n = the number
of token shards). Routing happens before the shard_map (GSPMD, on the token-sharded activations, so
`router_stats` sees the full routing and `MoEStats` keep their meaning); per shard:

1. replicate each local token k times, sort the T_l*k slots by expert (hence by owning shard);
2. pack them into a send buffer [ep, C, H] (row d = the slots for shard d, zero-padded to C rows), and
   exchange with `jax.lax.all_to_all` over `expert` (with the local expert id of every row, `E_l` = padding);
3. sort the ep*C received rows by local expert and run the experts' SwiGLU
   (`grouped_matmul.expert_swiglu`, the same code as the single-device path) with the local group sizes
   (padding rows are sorted last, past sum(group sizes), and come out zero);
4. unsort, inverse `all_to_all`, unpack to slot order, unsort to token order, weighted combine.

`jax.lax.ragged_all_to_all` would send only the real rows, but XLA:CPU does not implement it (jax 0.10.2:
"UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so the exchange
is a padded dense all-to-all with a static per-destination capacity C. The lossless default is
C = T_l*k (every local slot may go to one shard). Memory/compute cost per shard is then ep times the
slot count of the unsharded dispatch: send and receive buffers of [ep * T_l*k, H] and a grouped-matmul
hidden of [ep * T_l*k, I] (which is also the static worst case a receiver can get: all slots of all shards
for its experts). `capacity_factor` lowers C to ceil(cf * T_l*k / ep) (cf = 1: the balanced load); slots
past C toward one shard are then dropped (they contribute zero, like the capacity dispatch), highest
expert ids first within that shard's experts. Gradients flow through everything: the packing gathers and
permutations have gather-only custom VJPs, all_to_all transposes to the inverse all_to_all, and shard_map
psums the weight cotangents over the axes the weights are replicated on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ernie_jax.model.grouped_matmul import expert_swiglu
from ernie_jax.model.permute import gather_rows, permute_rows, sort_permutation
from ernie_jax.model.router import Routing
from ernie_jax.sharding import current_rules, logical_to_spec, resolve_rules

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class EPPlan:
    """How the routed experts run expert-parallel on the current mesh."""

    ep: int  # size of the expert mesh axis
    token_axes: tuple[str, ...]  # mesh axes the tokens [T, H] are sharded over (includes `expert`)


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel_plan(num_experts: int, num_tokens: int) -> EPPlan | None:
    """The plan for [num_tokens, H] activations on the current (abstract) mesh, or None when expert
    parallelism does not apply (no mesh, a mesh that is not all `AxisType.Auto`, expert axis of size 1,
    rules that do not shard the experts over it, or sizes it does not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or not mesh.are_all_axes_auto:
        return None  # (inside another shard_map, or Explicit axes: not handled, GSPMD path)
    shape = dict(mesh.shape)
    ep = shape[EXPERT_AXIS]
    if ep <= 1 or num_experts % ep:
        return None
    rules = current_rules() or resolve_rules("dp")
    if _spec_axes(logical_to_spec(("expert",), (num_experts,), shape, rules)[0]) != (EXPERT_AXIS,):
        return None
    token_axes = _spec_axes(logical_to_spec(("act_batch",), (num_tokens,), shape, rules)[0])
    if EXPERT_AXIS not in token_axes:
        return None
    return EPPlan(ep=ep, token_axes=token_axes)


def _local(x, ids, w, wg, wu, wo, *, ep: int, cap: int, act: Callable, impl: str, tile: int):
    """One shard: x [T_l, H], ids/w [T_l, k], wg/wu [E_l, H, I], wo [E_l, I, H] -> [T_l, H]."""
    t, k = ids.shape
    n, el, h = t * k, wg.shape[0], x.shape[1]
    # 1. slots sorted by (global) expert, hence by destination shard
    flat = ids.reshape(-1)
    order, inverse = sort_permutation(flat)
    xs = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [n, H]
    sorted_ids = flat[order]
    dest = sorted_ids // el
    send_sizes = jnp.bincount(dest, length=ep)
    starts = jnp.cumsum(send_sizes) - send_sizes
    # 2. pack: buffer row p = d*C + c holds sorted slot starts[d] + c (if c < send_sizes[d])
    p = jnp.arange(ep * cap)
    pd, pc = p // cap, p % cap
    buf_valid = pc < send_sizes[pd]
    buf_src = jnp.where(buf_valid, starts[pd] + pc, 0)
    pos = jnp.arange(n) - starts[jnp.minimum(dest, ep - 1)]  # sorted slot -> its row in the destination's block
    slot_valid = (pos < cap) & (dest < ep)  # id E (a VL token of the other modality's pool): sent nowhere
    slot_dst = jnp.where(slot_valid, dest * cap + pos, 0)
    send = gather_rows(xs, buf_src, buf_valid, slot_dst, slot_valid)
    send_lid = jnp.where(buf_valid, sorted_ids[buf_src] % el, el)  # local expert id, el = padding
    a2a = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)  # noqa: E731
    recv = a2a(send.reshape(ep, cap, h)).reshape(ep * cap, h)
    recv_lid = a2a(send_lid.reshape(ep, cap)).reshape(-1)
    # 3. local experts on the received rows, padding sorted last
    order2, inverse2 = sort_permutation(recv_lid)
    sizes = jnp.bincount(recv_lid, length=el)  # the padding id el is out of range: not counted
    xr = permute_rows(recv, order2, inverse2)
    yr = permute_rows(expert_swiglu(xr, wg, wu, wo, sizes, act=act, impl=impl, tile=tile), inverse2, order2)
    # 4. back to the senders, slot order, token order
    back = a2a(yr.reshape(ep, cap, h)).reshape(ep * cap, h)
    ys = gather_rows(back, slot_dst, slot_valid, buf_src, buf_valid)  # [n, H] sorted order
    y = permute_rows(ys, inverse, order).reshape(t, k, h)
    return jnp.einsum("TKH,TK->TH", y, w.astype(y.dtype))


def dropless_expert_parallel(x: jax.Array, r: Routing, wg: jax.Array, wu: jax.Array, wo: jax.Array, *,
                             plan: EPPlan, act: Callable, impl: str = "auto", tile: int = 0,
                             capacity_factor: float | None = None) -> jax.Array:
    """x [T, H] (T sharded over plan.token_axes), routing of x, expert weights wg/wu [E, H, I], wo [E, I, H]
    (sharded over `expert` on their leading axis; other dims are gathered first) -> [T, H].

    capacity_factor None: lossless (per-destination capacity T_l*k); else C = ceil(cf * T_l*k / ep)."""
    t, k = r.expert_ids.shape
    n_tok = math.prod(dict(jax.sharding.get_abstract_mesh().shape)[a] for a in plan.token_axes)
    slots = (t // n_tok) * k
    cap = slots if capacity_factor is None else max(1, min(slots, math.ceil(capacity_factor * slots / plan.ep)))
    tok = P(plan.token_axes, None)
    wspec = P(EXPERT_AXIS, None, None)
    # The Pallas interpreter (the kernel off TPU) fails jax's varying-axes check inside shard_map.
    interpreted_pallas = impl == "pallas" and jax.default_backend() != "tpu"
    fn = jax.shard_map(
        lambda *a: _local(*a, ep=plan.ep, cap=cap, act=act, impl=impl, tile=tile),
        in_specs=(tok, tok, tok, wspec, wspec, wspec), out_specs=tok, check_vma=not interpreted_pallas)
    return fn(x, r.expert_ids, r.weights, wg, wu, wo)
