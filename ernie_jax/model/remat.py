"""Rematerialisation policies for the scanned decoder layer, by name (`ErnieConfig.remat_policy`).

The layer tags its activations with `checkpoint_name`: `query_proj`, `key_proj`, `value_proj`,
`attention_out`, `out_proj`, `mlp_gate`, `mlp_up`, `mlp_out`. A policy says which of them the backward
pass keeps; everything else is recomputed.
"""

from __future__ import annotations

from typing import Callable

import jax

_cp = jax.checkpoint_policies
_QKV = ("query_proj", "key_proj", "value_proj")
_ATTN = _QKV + ("attention_out", "out_proj")
_MLP = ("mlp_gate", "mlp_up", "mlp_out")

POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: every intermediate is kept
    "full": _cp.nothing_saveable,  # keep only the layer inputs
    "dots": _cp.dots_saveable,  # keep every matmul output
    "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,  # keep projections, recompute attention scores
    "save_qkv": _cp.save_only_these_names(*_QKV),
    "save_attn": _cp.save_only_these_names(*_ATTN),
    "save_attn_mlp": _cp.save_only_these_names(*_ATTN, *_MLP),
}


def remat(fn: Callable, policy_name: str) -> Callable:
    """`fn` wrapped in `jax.checkpoint` with the named policy ("none" returns `fn` unchanged)."""
    if policy_name not in POLICIES:
        raise ValueError(f"unknown remat policy {policy_name!r}; known: {sorted(POLICIES)}")
    if policy_name == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy_name], prevent_cse=False)
