"""Expert parallelism (dropless MoE over the `expert` mesh axis) equals the single-device model exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ernie_jax import get_preset
from ernie_jax.model import create_model
from ernie_jax.model.expert_parallel import EPPlan, dropless_expert_parallel, expert_parallel_plan
from ernie_jax.model.mlp import ACTIVATIONS
from ernie_jax.model.router import Routing
from ernie_jax.sharding import MeshConfig, activate, logical_to_spec, make_mesh, param_shardings, resolve_rules

# 8 experts, top-2, 1 shared expert; two MoE layers in one scanned stack (one stack keeps compiles short)
CFG = get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=0)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 12)), jnp.int32)
AM = jnp.asarray(np.random.RandomState(1).rand(8, 12) > 0.2, jnp.int32).at[:, 0].set(1)
RULES = resolve_rules("fsdp")
MIXED = MeshConfig(data=2, expert=2, fsdp=2)


def _loss_fn(graphdef):
    def loss(state, ids, am):
        out = nnx.merge(graphdef, state)(ids, attention_mask=am)
        lp = jax.nn.log_softmax(out.logits[:, :-1])
        nll = -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
        st = out.moe_stats
        n = st.num_tokens  # [L]: stats are stacked over MoE layers
        aux = jnp.sum(st.topk_count * st.prob_sum / n[:, None] ** 2) + 1e-3 * jnp.sum(st.z_sum / n)
        return nll + aux, out
    return loss


def _run(graphdef, state, ids, am):
    """-> (loss, output, grads, StableHLO text of the jitted value_and_grad)."""
    lowered = jax.jit(jax.value_and_grad(_loss_fn(graphdef), has_aux=True)).lower(state, ids, am)
    (loss, out), grads = lowered.compile()(state, ids, am)
    return loss, out, grads, lowered.as_text()


@pytest.fixture(scope="module")
def models():
    """The model built sharded on the mixed mesh (one init compile), and the single-device reference run."""
    mesh = make_mesh(MIXED)
    model = create_model(CFG, seed=0, mesh=mesh, rules="fsdp")
    assert model.decoder.stacks[0].layers.mlp.experts.wi_gate[...].sharding.spec == P(None, "expert", "fsdp", None)
    g, st = nnx.split(model)
    st1 = jax.device_put(st, jax.devices()[0])
    loss, out, grads, hlo = _run(g, st1, IDS, AM)
    assert "all_to_all" not in hlo
    return g, st, (loss, out, grads)


# no expert axis (the GSPMD path), several / one local expert per shard, and a data axis among the token axes
CASES = [MeshConfig(expert=1, fsdp=-1), MeshConfig(expert=2, fsdp=-1), MeshConfig(expert=8, fsdp=-1), MIXED]


@pytest.mark.parametrize("mesh_cfg", CASES, ids=lambda m: f"d{m.data}-f{m.fsdp}-e{m.expert}")
def test_expert_parallel_matches_single_device(mesh_cfg, models):
    g, st, (ref_loss, ref_out, ref_grads) = models
    mesh = make_mesh(mesh_cfg)
    ep = mesh.shape["expert"]
    if mesh_cfg != MIXED:  # same values, this mesh's layout
        st = jax.device_put(st, param_shardings(st, mesh, RULES))
    if ep > 1:  # the expert weights really are split over the expert axis
        assert st["decoder"]["stacks"][0]["layers"]["mlp"]["experts"]["wo"][...].sharding.spec[1] == "expert"
    with activate(mesh, RULES):
        spec = NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), IDS.shape, dict(mesh.shape), RULES))
        loss, out, grads, hlo = _run(g, st, jax.device_put(IDS, spec), jax.device_put(AM, spec))
    assert ("all_to_all" in hlo) == (ep > 1)  # the shard_map's exchange, in the StableHLO
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref_out.logits), atol=1e-5)
    for name in ("topk_count", "prob_sum", "num_tokens", "z_sum", "usage"):
        np.testing.assert_allclose(np.asarray(getattr(out.moe_stats, name)),
                                   np.asarray(getattr(ref_out.moe_stats, name)), atol=1e-5, err_msg=name)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, v in nnx.to_flat_state(grads):
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(flat_ref[path].get_value()), atol=1e-5,
                                   err_msg=str(path))


def test_plan_only_where_it_applies():
    assert expert_parallel_plan(8, 96) is None  # no mesh
    mesh = make_mesh(MeshConfig(expert=4, fsdp=-1))
    with activate(mesh, "fsdp"):
        assert expert_parallel_plan(8, 96) == EPPlan(ep=4, token_axes=("fsdp", "expert"))
        assert expert_parallel_plan(6, 96) is None  # experts not divisible by the axis
        assert expert_parallel_plan(8, 1) is None  # one token (decoding): GSPMD path
    with activate(mesh, MeshConfig(rule_overrides=(("expert", None),))):  # the off switch
        assert expert_parallel_plan(8, 96) is None
    with activate(make_mesh(MeshConfig(expert=1, fsdp=-1)), "fsdp"):
        assert expert_parallel_plan(8, 96) is None


def test_capacity_knob_drops_only_overflow():
    """A per-destination capacity that covers the busiest shard's load changes nothing; one row less drops."""
    mesh = make_mesh(MeshConfig(expert=4, fsdp=-1))  # 8 token shards, 4 expert shards of 2 experts
    e, h, i, t, k = 8, 16, 8, 64, 2
    rs = np.random.RandomState(0)
    x = rs.randn(t, h).astype(np.float32)
    wg, wu = (0.3 * rs.randn(e, h, i).astype(np.float32) for _ in range(2))
    wo = 0.3 * rs.randn(e, i, h).astype(np.float32)
    logits = rs.randn(t, e).astype(np.float32)
    ids = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
    w = rs.rand(t, k).astype(np.float32)
    r = Routing(logits=logits, probs=logits, expert_ids=ids, weights=w)
    slots = t // 8 * k
    dest = ids.reshape(8, slots) // 2
    need = max(np.bincount(row, minlength=4).max() for row in dest)  # busiest (token shard, destination)
    assert need < slots
    xn = x.astype(np.float64)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    ffn = lambda j, e_: silu(xn[j] @ wg[e_]) * (xn[j] @ wu[e_]) @ wo[e_]  # noqa: E731
    ref = np.stack([sum(w[j, c] * ffn(j, ids[j, c]) for c in range(k)) for j in range(t)])
    with activate(mesh, "fsdp"):
        plan = expert_parallel_plan(e, t)
        run = lambda cf: np.asarray(jax.jit(lambda *a: dropless_expert_parallel(  # noqa: E731
            *a, plan=plan, act=ACTIVATIONS["silu"], capacity_factor=cf))(x, r, wg, wu, wo))
        enough, short = run(need * 4 / slots), run((need - 1) * 4 / slots)
    np.testing.assert_allclose(enough, ref, atol=1e-5)
    dropped = ~np.isclose(short, ref, atol=1e-5).all(-1)
    assert 0 < dropped.sum() <= 8  # at most one slot per token shard lost


def test_vl_isolated_pools_expert_parallel_match_single_device():
    """VL blocks send the other modality's slots to expert id E: expert-parallel drops them exactly like the
    single-device dispatch (values and gradients)."""
    from ernie_jax.model.moe import MoEBlock
    # the other modality's slots are dropped before the grouped matmul (expert-parallel) or masked after it
    # (single device), whichever implementation it is: the one that compiles fastest on CPU
    cfg = get_preset("tiny-vl-test", moe_gmm_impl="ragged_dot")
    block = nnx.merge(*nnx.split(MoEBlock(cfg, rngs=nnx.Rngs(3))))
    g, st = nnx.split(block)
    st = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), st)
    x = jnp.asarray(np.random.RandomState(2).randn(8, 12, cfg.hidden_size), jnp.float32)
    modality = jnp.asarray(np.random.RandomState(3).randint(0, 3, (8, 12)), jnp.int32)
    cot = jnp.asarray(np.random.RandomState(4).randn(*x.shape), jnp.float32)

    def loss(st, x, modality):
        y, stats = nnx.merge(g, st)(x, None, modality)
        return jnp.sum(y * cot), (y, stats)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (ref_y, ref_stats)), ref_grads = f(st, x, modality)
    mesh = make_mesh(MeshConfig(expert=4, fsdp=-1))
    with activate(mesh, RULES):
        spec = NamedSharding(mesh, logical_to_spec(("act_batch", "act_length", "act_embed"), x.shape,
                                                   dict(mesh.shape), RULES))
        st_s, x_s = jax.device_put(st, param_shardings(st, mesh, RULES)), jax.device_put(x, spec)
        assert expert_parallel_plan(cfg.moe_num_experts, 96) is not None
        lowered = f.lower(st_s, x_s, modality)  # the program that runs below
        assert "all_to_all" in lowered.as_text()
        (_, (y, stats)), grads = lowered.compile()(st_s, x_s, modality)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.usage), np.asarray(ref_stats.usage))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
