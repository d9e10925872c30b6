"""Operand casts around a `lax.switch` inside `jax.shard_map` (e.g. expert parallelism: weights vary over
`expert`, rows over `fsdp` too), shared by `bucketed` and the fused expert SwiGLU."""

from __future__ import annotations

import jax


def vma(x: jax.Array) -> frozenset:
    """The shard_map mesh axes that x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; `vma` in other versions
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def all_varying(*xs: jax.Array) -> list[jax.Array]:
    """Every operand cast to vary over the union of their axes before the switch. Otherwise AD of a branch
    transposes the implicit cast of a less-varying operand into a psum, a collective inside a branch that shards
    may not all take (each picks its branch from its own group sizes), and the branches' output types would
    differ."""
    axes = frozenset().union(*map(vma, xs))
    return [jax.lax.pcast(x, tuple(sorted(axes - vma(x))), to="varying") if axes - vma(x) else x for x in xs]


def sum_to(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent of a cast-to-varying operand: summed over the axes the primal does not vary over,
    outside the switch (the transpose of `all_varying`)."""
    extra = tuple(sorted(vma(ct) - vma(primal)))
    return jax.lax.psum(ct, extra) if extra else ct
