import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax import get_preset
from ernie_jax.model import create_model
from ernie_jax.sharding import (MeshConfig, activate, logical_axes, logical_to_spec, make_mesh, resolve_rules,
                                shard, sharding_table)
from ernie_jax.sharding.rules import ACTIVATION_AXES, PARAM_AXES, RULE_PRESETS

MESH = {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "tensor": 2}


def test_every_preset_maps_every_name():
    for name, rules in RULE_PRESETS.items():
        assert set(rules) == set(PARAM_AXES + ACTIVATION_AXES), name


def test_logical_to_spec():
    rules = resolve_rules("fsdp_tensor")
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), MESH, rules) == P("fsdp", "tensor", None)
    assert logical_to_spec(("act_batch", "act_length"), (8, 16), MESH, rules) == P(("data", "fsdp"), None)
    # a dimension the axis does not divide stays replicated (kv_heads = 1 under tensor parallelism)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), MESH, rules) == P("fsdp", None, None)
    # an axis is used at most once per array
    rules2 = dict(rules, mlp="fsdp")
    assert logical_to_spec(("embed", "mlp"), (64, 64), MESH, rules2) == P("fsdp", None)
    # size-1 axes are dropped
    assert logical_to_spec(("layers", "embed"), (4, 64), MESH, rules) == P(None, "fsdp")
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'bogus'"):
        logical_to_spec(("bogus",), (4,), MESH, rules)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (4, 4), MESH, rules)


def test_overrides_merge_by_name_and_twice_is_an_error():
    r = resolve_rules(MeshConfig(rules="fsdp", rule_overrides=(("vocab", "tensor"),)))
    assert r["vocab"] == "tensor" and r["embed"] == "fsdp"
    with pytest.raises(ValueError, match="twice"):
        resolve_rules(MeshConfig(rule_overrides=(("vocab", "tensor"), ("vocab", None))))
    with pytest.raises(ValueError, match="unknown logical axis"):
        resolve_rules(MeshConfig(rule_overrides=(("vocabulary", "tensor"),)))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        resolve_rules(MeshConfig(rule_overrides=(("vocab", "model"),)))
    with pytest.raises(ValueError, match="unknown sharding rules preset"):
        resolve_rules("zero3")


CASES = [("dp", MeshConfig(data=-1, fsdp=1)), ("fsdp", MeshConfig(data=2, fsdp=-1)),
         ("tensor", MeshConfig(data=2, fsdp=1, tensor=-1)), ("fsdp_tensor", MeshConfig(data=2, fsdp=2, tensor=2)),
         ("fsdp_tensor", MeshConfig(pipeline=2, fsdp=2, tensor=2))]


def _forward(model, ids):
    g, st = nnx.split(model)
    return jax.jit(lambda st, ids: nnx.merge(g, st)(ids).logits)(st, ids)


@pytest.fixture(scope="module")
def reference():
    cfg = get_preset("tiny-test", num_key_value_heads=4, use_bias=True, tie_word_embeddings=False)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 12)), jnp.int32)
    return cfg, ids, np.asarray(_forward(create_model(cfg, seed=5), ids))


@pytest.mark.parametrize("preset, mesh_cfg", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_params_sharded_as_rules_say_and_forward_matches(preset, mesh_cfg, reference):
    cfg, ids, ref = reference
    mesh = make_mesh(mesh_cfg)
    rules = resolve_rules(preset)
    model = create_model(cfg, seed=5, mesh=mesh, rules=rules)
    n_sharded = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = v.get_value()
        want = logical_to_spec(logical_axes(v), arr.shape, dict(mesh.shape), rules)
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, want), arr.ndim), (path, arr.sharding, want)
        n_sharded += any(s is not None for s in want)
    if preset != "dp":
        assert n_sharded > 0
    with activate(mesh, rules):
        ids_sh = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), ids.shape,
                                                                          dict(mesh.shape), rules)))
        out = _forward(model, ids_sh)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_expected_specs_for_fsdp_tensor():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = create_model(get_preset("tiny-test", num_key_value_heads=4), mesh=mesh, rules="fsdp_tensor")
    stack = model.decoder.stacks[0].layers
    assert stack.attn.wq[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert stack.mlp.wo[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")


def test_shard_constrains_inside_activate_and_is_noop_outside():
    x = jnp.ones((8, 4))
    assert shard(x, ("act_batch", None)) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1))
    with activate(mesh, "fsdp"):
        y = jax.jit(lambda a: shard(a * 2, ("act_batch", None)))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)


def test_sharding_table_lists_every_param(caplog):
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1))
    model = create_model(get_preset("tiny-test"), mesh=mesh, rules="fsdp")
    table = sharding_table(nnx.state(model, nnx.Param), mesh, resolve_rules("fsdp"))
    logging.getLogger("test").info("\n%s", table)
    assert "| decoder.stacks.0.layers.attn.wq | (2, 32, 4, 16) | ('layers', 'embed', 'heads', 'head_dim') | " \
           "(None, 'fsdp', None, None) | (2, 8, 4, 16) |" in table
    n_params = len(list(nnx.to_flat_state(nnx.state(model, nnx.Param))))
    assert table.count("\n| ") == n_params  # one row per parameter below the header
    assert "MiB per device" in table
