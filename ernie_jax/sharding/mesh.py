"""The device mesh: five named axes, sizes from config, one of them may be -1 (= the rest).

Axis order, outermost first: `data`, `pipeline`, `fsdp`, `expert`, `tensor` - the innermost axes get the
fastest interconnect (`jax.make_mesh` lays devices out by physical topology on TPU).
Every axis is `AxisType.Auto` (classic GSPMD): jax 0.10's `make_mesh` would default to Explicit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "pipeline", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Mesh axis sizes and the logical-to-mesh rules used on it.

    `rules` names a preset of `ernie_jax.sharding.rules.RULE_PRESETS`; `rule_overrides` replaces the
    mapping of the logical names it lists (merged by name, a name listed twice is an error).
    """

    data: int = 1
    pipeline: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    rules: str = "fsdp"
    rule_overrides: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ()

    def __post_init__(self):
        sizes = self.axis_sizes()
        bad = {k: v for k, v in sizes.items() if not (isinstance(v, int) and (v == -1 or v >= 1))}
        if bad:
            raise ValueError(f"MeshConfig: axis sizes must be >= 1 or -1, got {bad}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")
        object.__setattr__(self, "rule_overrides", tuple(tuple(r) for r in self.rule_overrides))

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 filled in; an error if they do not multiply to `num_devices`."""
        sizes = self.axis_sizes()
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if num_devices % fixed:
                raise ValueError(f"MeshConfig {sizes}: the fixed axes multiply to {fixed}, which does not divide "
                                 f"the {num_devices} devices")
            sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        elif fixed != num_devices:
            raise ValueError(f"MeshConfig {sizes}: axes multiply to {fixed} but there are {num_devices} devices "
                             "(set one axis to -1 to take the rest)")
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with the five axes of `MESH_AXES`, all `AxisType.Auto`."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
