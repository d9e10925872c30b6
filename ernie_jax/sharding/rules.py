"""Logical axis names -> mesh axes.

Model code names every parameter dimension and every key activation dimension logically (`embed`,
`heads`, `act_batch`, ...); the physical mapping lives only here, in named presets chosen by config
(`MeshConfig.rules`) and merged with per-experiment overrides. Resolution is shape-aware: a mesh axis of
size 1, an axis already used by another dimension of the same array, or one that does not divide the
dimension is left out (e.g. `kv_heads = 1` stays replicated under tensor parallelism) - the sharding
table logged at start-up shows what each array really got.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ernie_jax.sharding.mesh import MESH_AXES, MeshConfig

AxisRule = str | tuple[str, ...] | None
Rules = Mapping[str, AxisRule]

PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers", "expert", "moe_mlp",
              "vit_embed", "vit_heads", "vit_mlp")  # (the last three: the VL model's ViT and adapter)
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_head_dim",
                   "act_mlp", "act_vocab", "act_expert")

# Every preset maps every name. The batch is sharded over data, fsdp and expert: outside the MoE block
# the expert axis acts as data parallelism (MaxText does the same).
_BASE: dict[str, AxisRule] = {
    **{a: None for a in PARAM_AXES + ACTIVATION_AXES},
    "layers": "pipeline", "expert": "expert", "act_expert": "expert", "act_batch": ("data", "fsdp", "expert"),
}
_FSDP: dict[str, AxisRule] = {"embed": "fsdp", "vit_embed": "fsdp"}  # ZeRO-3: weights split along the hidden dim
_TENSOR: dict[str, AxisRule] = {  # Megatron: heads and FFN width split, activations follow
    "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "moe_mlp": "tensor",
    "vit_heads": "tensor", "vit_mlp": "tensor",
    "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
}
RULE_PRESETS: dict[str, dict[str, AxisRule]] = {
    "dp": _BASE,  # parameters replicated, batch split
    "fsdp": {**_BASE, **_FSDP},
    "tensor": {**_BASE, **_TENSOR},
    "fsdp_tensor": {**_BASE, **_FSDP, **_TENSOR},
}

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("ernie_jax_rules", default=None)


def resolve_rules(config: MeshConfig | str | Rules) -> dict[str, AxisRule]:
    """The rules table of a `MeshConfig` (preset + overrides), a preset name, or a table (checked)."""
    if isinstance(config, MeshConfig):
        rules = dict(resolve_rules(config.rules))
        seen = set()
        for name, axes in config.rule_overrides:
            if name in seen:
                raise ValueError(f"rule_overrides sets logical axis {name!r} twice")
            seen.add(name)
            if name not in rules:
                raise ValueError(f"rule_overrides: unknown logical axis {name!r}; known: {sorted(rules)}")
            rules[name] = _check_axes(name, axes)
        return rules
    if isinstance(config, str):
        if config not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules preset {config!r}; known: {sorted(RULE_PRESETS)}")
        return dict(RULE_PRESETS[config])
    return {k: _check_axes(k, v) for k, v in config.items()}


def _check_axes(name: str, axes: Any) -> AxisRule:
    if axes is None or isinstance(axes, str):
        axes_t = () if axes is None else (axes,)
    else:
        axes_t = tuple(axes)
    bad = [a for a in axes_t if a not in MESH_AXES]
    if bad:
        raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; mesh axes: {MESH_AXES}")
    return axes if axes is None or isinstance(axes, str) else axes_t


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Rules) -> P:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}")
        axes = rules[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        chosen, size = [], 1
        for a in axes:
            n = mesh_shape.get(a, 1)
            if n == 1 or a in used or dim % (size * n):
                continue
            chosen.append(a)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules | MeshConfig | str) -> Iterator[None]:
    """Sets `mesh` as jax's current mesh and `rules` as the table `shard` uses, for tracing in the block."""
    token = _RULES.set(resolve_rules(rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules | None:
    return _RULES.get()


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `activate(...)`."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape), rules))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(v: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was created with (`None` per dim when it has none)."""
    names = v.get_metadata().get("logical_axes")
    return tuple(names) if names is not None else (None,) * np.ndim(v.get_value())


def param_specs(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """The state's tree with every variable's value replaced by its PartitionSpec."""
    shape = dict(mesh.shape)
    return jax.tree.map(lambda v: v.replace(logical_to_spec(logical_axes(v), v.get_value().shape, shape, rules)),
                        state, is_leaf=_is_var)


def param_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """The state's tree with every variable's value replaced by its NamedSharding on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def sharding_table(state: Any, mesh: Mesh, rules: Rules) -> str:
    """A Markdown table: parameter path, shape, logical axes, mesh spec, per-device shape, and a total."""
    specs = nnx.to_flat_state(param_specs(state, mesh, rules))
    values = dict(nnx.to_flat_state(state))
    rows = ["| parameter | shape | logical axes | mesh spec | per device |", "|---|---|---|---|---|"]
    total = per_dev = 0
    for path, sv in specs:
        v = values[path]
        arr = v.get_value()
        spec = sv.get_value()
        local = list(arr.shape)
        for i, ax in enumerate(spec):
            for a in (() if ax is None else (ax,) if isinstance(ax, str) else ax):
                local[i] //= mesh.shape[a]
        nbytes = np.dtype(arr.dtype).itemsize
        total += math.prod(arr.shape) * nbytes
        per_dev += math.prod(local) * nbytes
        rows.append(f"| {'.'.join(map(str, path))} | {tuple(arr.shape)} | {logical_axes(v)} | {tuple(spec)} | "
                    f"{tuple(local)} |")
    rows.append(f"\nmesh {dict(mesh.shape)}: {total / 2**20:.2f} MiB of parameters, "
                f"{per_dev / 2**20:.2f} MiB per device")
    return "\n".join(rows)
