"""One mesh (`data`, `pipeline`, `fsdp`, `expert`, `tensor`) and logical-name sharding rules."""

from ernie_jax.sharding.mesh import MESH_AXES, MeshConfig, make_mesh
from ernie_jax.sharding.rules import (RULE_PRESETS, activate, current_rules, logical_axes, logical_to_spec,
                                      param_shardings, param_specs, resolve_rules, shard, sharding_table)

__all__ = ["MESH_AXES", "MeshConfig", "make_mesh", "RULE_PRESETS", "activate", "current_rules", "logical_axes",
           "logical_to_spec", "param_shardings", "param_specs", "resolve_rules", "shard", "sharding_table"]
