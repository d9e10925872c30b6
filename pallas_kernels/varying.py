"""Output types of `pallas_call`s that also work inside a `jax.shard_map` that checks varying manual axes.

There a pallas_call's output type must say over which mesh axes it varies: those any operand varies over
(e.g. the expert axis through a group offset from `axis_index`). jax 0.10 spells this `manual_axis_type`
(`.mat` of an aval), older releases `vma`; where neither exists nothing is needed.
"""

from __future__ import annotations

import jax


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    avals = [jax.typeof(x) for x in operands]
    mat_cls = getattr(jax.sharding, "ManualAxisType", None)
    if mat_cls is not None and all(hasattr(a, "mat") for a in avals):
        varying = frozenset().union(*(a.mat.varying for a in avals))
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat_cls(varying=varying))
    vma = frozenset().union(*(getattr(a, "vma", frozenset()) for a in avals))
    try:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    except TypeError:
        return jax.ShapeDtypeStruct(shape, dtype)
