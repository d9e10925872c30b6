"""The MoE block: every dispatch path (dense included) matches an oracle written in the test from the raw
weights (values and gradients) whenever nothing is dropped, the capacity path drops exactly the slots GShard's
queue order says, and MoEStats reproduce transformers' aux loss.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.model.moe import Experts, MoEBlock
from ernie_jax.model.permute import permute_rows
from ernie_jax.model.router import RouterBias, Routing

CFG = get_preset("tiny-moe-test", moe_layer_end_index=2)  # 8 experts, top-2, 1 shared expert
E, K, H = CFG.moe_num_experts, CFG.moe_k, CFG.hidden_size


def _randomise(module, seed, std=0.2, bias_std=0.05):
    """Random values everywhere (norm scales ~1) and a non-zero correction bias; works on abstract modules."""
    r = np.random.RandomState(seed)
    g, st = nnx.split(module)
    flat = []
    for path, v in nnx.to_flat_state(st):
        shape, dt = v.get_value().shape, v.get_value().dtype
        noise = r.randn(*shape)
        val = 1 + 0.1 * noise if path[-1] == "scale" else (bias_std if isinstance(v, RouterBias) else std) * noise
        flat.append((path, v.replace(jnp.asarray(val, dt))))
    return nnx.merge(g, nnx.from_flat_state(flat))


def _block(seed=0, **changes):
    return _randomise(nnx.eval_shape(lambda: MoEBlock(CFG.replace(**changes), rngs=nnx.Rngs(0))), seed)


def _x(b=2, s=16, seed=1):
    return jnp.asarray(np.random.RandomState(seed).randn(b, s, H), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _block_run(g, st, x, cot, mask):
    """-> (y, stats, (d state, d x)) of sum(y * cot)."""
    def f(st, x):
        y, stats = nnx.merge(g, st)(x, mask)
        return jnp.sum(y * cot), (y, stats)

    (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(st, x)
    return y, stats, grads


def _run(block, x, mask=None, seed=2):
    cot = jnp.asarray(np.random.RandomState(seed).randn(*x.shape), jnp.float32)
    return _block_run(*nnx.split(block), x, cot, mask)


def _expert_out(ex, xt):
    """f_e(x) for every expert and token (numpy, float64): [E, T, H]."""
    wg, wu, wo = (np.asarray(w[...], np.float64) for w in (ex.wi_gate, ex.wi_up, ex.wo))
    x = np.asarray(xt, np.float64)
    gate, up = np.einsum("TH,EHI->ETI", x, wg), np.einsum("TH,EHI->ETI", x, wu)
    return np.einsum("ETI,EIH->ETH", gate / (1 + np.exp(-gate)) * up, wo)


# ------------------------------------------------------------------------------------------- the oracle
def _arrays(module):
    """The module's raw arrays by dotted path ("router.kernel", "experts.wi_gate", ...)."""
    return {".".join(map(str, p)): jnp.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def _np_selection(xt, kernel, bias, k):
    """The chosen experts [T, k] (float64 numpy): top-k of softmax(x @ W) + bias, best first (§3.5)."""
    z = np.asarray(xt, np.float64) @ np.asarray(kernel, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.argsort(-(p + np.asarray(bias, np.float64)), axis=-1, kind="stable")[:, :k]


def _swiglu(x, wg, wu, wo):
    """x [T, H] through per-token weights wg / wu [T, H, I], wo [T, I, H] -> [T, H]."""
    gate, up = jnp.einsum("th,thi->ti", x, wg), jnp.einsum("th,thi->ti", x, wu)
    return jnp.einsum("ti,tih->th", gate / (1 + jnp.exp(-gate)) * up, wo)


def _oracle_pool(xt, a, pool, ids, norm_min):
    """One routed pool from its definition (architecture doc §3.5): probs = softmax(x @ W_router) in fp32,
    the experts `ids` [T, k] (chosen on probs + bias, `_np_selection`), each weighted by its unbiased prob
    renormalised over the k (clamped at norm_min): y_t = sum_j w_tj SwiGLU_{ids_tj}(x_t). jnp, so that
    jax.grad gives the reference gradients (the selection itself has none)."""
    z = xt @ a[f"{pool[0]}.kernel"]
    p = jnp.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    w = jnp.take_along_axis(p, jnp.asarray(ids), -1)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), norm_min)
    ex = pool[1]
    return sum(w[:, j, None] * _swiglu(xt, a[f"{ex}.wi_gate"][ids[:, j]], a[f"{ex}.wi_up"][ids[:, j]],
                                       a[f"{ex}.wo"][ids[:, j]]) for j in range(ids.shape[1]))


def _oracle_shared(x, a):
    gate, up = x @ a["shared.wi_gate"], x @ a["shared.wi_up"]
    return (gate / (1 + jnp.exp(-gate)) * up) @ a["shared.wo"]


def _oracle_block(a, x, ids, cfg=CFG):
    """Text MoE block: the routed pool plus the shared expert on every token; x [B, S, H]."""
    xt = x.reshape(-1, x.shape[-1])
    return (_oracle_pool(xt, a, ("router", "experts"), ids, cfg.moe_norm_min) + _oracle_shared(xt, a)).reshape(x.shape)


def _block_ids(a, x):
    return _np_selection(x.reshape(-1, H), a["router.kernel"], a["router.bias"], K)


# ------------------------------------------------------------------------------------- dispatch paths
PATHS = {
    "dropless_bucketed": dict(moe_dispatch="dropless", moe_gmm_impl="bucketed"),  # the fused expert SwiGLU
    "dropless_tiled": dict(moe_dispatch="dropless", moe_gmm_impl="tiled"),
    "dropless_ragged_dot": dict(moe_dispatch="dropless", moe_gmm_impl="ragged_dot"),
    "capacity_no_drop": dict(moe_dispatch="capacity", moe_capacity_factor=E / K),  # capacity = T: never full
    "dense": dict(moe_dispatch="dense"),
}


@pytest.fixture(scope="module")
def oracle():
    """x, the oracle's y and its gradients (by path, and "x") of sum(y * cot), cot as in `_run`."""
    x = _x()
    a = _arrays(_block())
    ids = _block_ids(a, x)
    cot = jnp.asarray(np.random.RandomState(2).randn(*x.shape), jnp.float32)
    _, grads = jax.value_and_grad(lambda a, x: jnp.sum(_oracle_block(a, x, ids) * cot), argnums=(0, 1))(a, x)
    return x, _oracle_block(a, x, ids), dict(grads[0], x=grads[1])


@pytest.mark.parametrize("path", list(PATHS))
def test_dispatch_paths_match_the_oracle_values_and_gradients(path, oracle):
    x, y_ref, g_ref = oracle
    y, _, (g, gx) = _run(_block(**PATHS[path]), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(g_ref["x"]), atol=1e-5, rtol=1e-5)
    for p, v in nnx.to_flat_state(g):
        name = ".".join(map(str, p))
        if name == "router.bias":  # selection only: no gradient
            assert not np.asarray(v.get_value()).any()
            continue
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(g_ref[name]), atol=1e-5, rtol=1e-5,
                                   err_msg=name)


def test_capacity_queue_order_hand_made():
    """E=2, k=2, capacity 2. Queues hold all first choices in token order, then all second choices:
    expert 0: [t0, t2, t3 | t1] -> keeps t0, t2; expert 1: [t1 | t0, t2, t3] -> keeps t1, t0.
    So t1's first choice beats t0's second one, and t3 (later) loses its first choice to t0 and t2."""
    ex = _randomise(nnx.eval_shape(lambda: Experts(2, H, 16, act="silu", std=0.02, param_dtype=jnp.float32,
                                                   rngs=nnx.Rngs(0))), 3)
    x = jnp.asarray(np.random.RandomState(4).randn(4, H), jnp.float32)
    ids = np.array([[0, 1], [1, 0], [0, 1], [0, 1]], np.int32)
    w = np.random.RandomState(5).uniform(0.2, 1.0, (4, 2)).astype(np.float32)
    r = Routing(logits=jnp.zeros((4, 2)), probs=jnp.zeros((4, 2)), expert_ids=jnp.asarray(ids), weights=jnp.asarray(w))
    out = np.asarray(ex.capacity(x, r, capacity_factor=0.5))  # C = ceil(0.5 * 4 * 2 / 2) = 2
    kept = np.array([[1, 1], [1, 0], [1, 0], [0, 0]], bool)
    f = _expert_out(ex, x)
    ref = np.stack([sum(w[t, j] * f[ids[t, j], t] for j in range(2) if kept[t, j]) + np.zeros(H) for t in range(4)])
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not out[3].any()


def test_capacity_drops_only_slots_past_the_queue_end(oracle):
    """A small capacity factor: the output differs from the dropless oracle exactly by the dropped slots' terms."""
    x, y_full, _ = oracle
    cf = 0.5
    blk = _block(moe_dispatch="capacity", moe_capacity_factor=cf)
    y, _, _ = _run(blk, x)
    t = x.shape[0] * x.shape[1]
    cap = int(np.ceil(cf * t * K / E))
    ids = _block_ids(_arrays(blk), x)
    z = np.asarray(x, np.float64).reshape(t, H) @ np.asarray(blk.router.kernel[...], np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    w = np.take_along_axis(p / p.sum(-1, keepdims=True), ids, -1)
    w /= w.sum(-1, keepdims=True)
    kept, fill = np.zeros((t, K), bool), np.zeros(E, int)
    for j in range(K):  # first choices of all tokens (in order), then second choices
        for i in range(t):
            kept[i, j] = fill[ids[i, j]] < cap
            fill[ids[i, j]] += 1
    lost = ~kept.all(1)
    assert 0 < lost.sum() < t and (~kept[:, 1]).sum() > (~kept[:, 0]).sum()
    f = _expert_out(blk.experts, x.reshape(t, H))
    dropped = np.stack([sum(w[i, j] * f[ids[i, j], i] for j in range(K) if not kept[i, j]) + np.zeros(H)
                        for i in range(t)])
    y, y_full = np.asarray(y).reshape(t, H), np.asarray(y_full).reshape(t, H)
    np.testing.assert_allclose(y, y_full - dropped, atol=1e-5)
    np.testing.assert_allclose(y[~lost], y_full[~lost], atol=1e-5)
    assert np.abs(y[lost] - y_full[lost]).max(1).min() > 1e-3


def test_permute_rows_gradient_is_the_gather_gradient():
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(12, 5), jnp.float32)
    order = jnp.asarray(rs.permutation(12), jnp.int32)
    inverse = jnp.argsort(order)
    cot = jnp.asarray(rs.randn(12, 5), jnp.float32)
    np.testing.assert_array_equal(np.asarray(permute_rows(x, order, inverse)), np.asarray(x[order]))
    g = jax.grad(lambda x: jnp.sum(permute_rows(x, order, inverse) * cot))(x)
    g_ref = jax.grad(lambda x: jnp.sum(x[order] * cot))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


# ------------------------------------------------------------------------------------------ statistics
def _np_stats(logits, bias, mask):
    """MoEStats from one layer's router logits [T, E] (float64 numpy)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = np.ones(len(z)) if mask is None else np.asarray(mask, np.float64).reshape(-1)

    def counts(ids):
        return np.stack([(m[:, None] * (ids == e)).sum() for e in range(E)])

    lse = np.log(np.exp(z).sum(-1))
    return dict(topk_count=counts(np.argsort(-p, -1)[:, :K]), prob_sum=(m[:, None] * p).sum(0),
                num_tokens=m.sum(), z_sum=(m * lse ** 2).sum(), usage=counts(np.argsort(-(p + bias), -1)[:, :K]))


def _check_stats(stats, ref):
    for k, v in ref.items():
        np.testing.assert_allclose(np.asarray(getattr(stats, k)), v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_block_stats_with_token_mask(oracle):
    x, _, _ = oracle
    blk = _block(moe_gmm_impl="ragged_dot")  # router statistics: the quickest grouped matmul to compile on CPU
    mask = np.ones(x.shape[:2], bool)
    mask[0, 10:] = False
    mask[1, :3] = False
    _, stats, _ = _run(blk, x, jnp.asarray(mask))
    logits = np.asarray(x, np.float64).reshape(-1, H) @ np.asarray(blk.router.kernel[...], np.float64)
    ref = _np_stats(logits, np.asarray(blk.router.bias[...]), mask)
    # the bias changes the selection (so usage != topk_count), and the other tests' routing is non-trivial
    assert (ref["topk_count"] != ref["usage"]).any()
    _check_stats(stats, ref)


def _random_model(cfg, seed):
    return _randomise(ernie_jax.abstract_model(cfg), seed, std=0.1)


@functools.partial(jax.jit, static_argnums=0)
def _lm_stats(g, st, ids, am):
    """MoEStats without and with the attention mask (one compile)."""
    model = nnx.merge(g, st)
    return model(ids).moe_stats, model(ids, attention_mask=am).moe_stats


@pytest.mark.hf
def test_stats_reproduce_transformers_aux_loss(tmp_path):
    """HF's load_balancing_loss_func (plain top-k, no bias, padding excluded) from MoEStats summed over the
    MoE layers, on the router logits of transformers running the same weights; per-layer stats in depth order."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import load_balancing_loss_func

    # router statistics: the quickest grouped matmul to compile on CPU (each backend has its own tests)
    cfg = get_preset("tiny-moe-test", num_hidden_layers=4, moe_layer_interval=2, moe_layer_end_index=3,
                     moe_gmm_impl="ragged_dot")
    moe_layers = [i for i in range(4) if cfg.is_moe_layer(i)]
    assert moe_layers == [1, 3]  # two MoE stacks separated by a dense one
    ours = _random_model(cfg, seed=0)
    ernie_jax.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                           experts_implementation="eager").eval()
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    am = np.ones_like(ids)
    am[0, 9:] = 0  # right padding
    am[1, :2] = 0  # left padding
    g, st = nnx.split(ours)
    biases = [np.asarray(ours.decoder.stacks[s].layers.mlp.router.bias[...][0]) for s in (1, 3)]
    for mask, stats in zip((None, am), _lm_stats(g, st, jnp.asarray(ids), jnp.asarray(am))):
        with torch.no_grad():
            out = hf(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                     output_router_logits=True)
        logits = [z.numpy() for z in out.router_logits]
        assert len(logits) == 2 and logits[0].shape == (24, E)
        assert stats.topk_count.shape == (2, E)
        for layer in range(2):
            _check_stats(jax.tree.map(lambda a: a[layer], stats), _np_stats(logits[layer], biases[layer], mask))
        n = stats.num_tokens.sum()
        aux = E * jnp.sum(stats.topk_count.sum(0) / n * stats.prob_sum.sum(0) / n)
        ref = load_balancing_loss_func(out.router_logits, E, K, None if mask is None else torch.tensor(mask))
        np.testing.assert_allclose(float(aux), float(ref), rtol=1e-6)
        np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-6)


# ------------------------------------------------------------------------------------ VL: modality isolation
VL = get_preset("tiny-vl-test")


def _vl_block(seed=0, **changes):
    return _randomise(nnx.eval_shape(lambda: MoEBlock(VL.replace(**changes), rngs=nnx.Rngs(0))), seed)


@functools.partial(jax.jit, static_argnums=0)
def _vl_run(g, st, x, mask, modality):
    return nnx.merge(g, st)(x, mask, modality)


def _pool_reference(block, x, vision):
    """Each token through its own pool only (text: router / experts, vision: vision_router / vision_experts),
    plus the shared expert: the oracle of one token at a time, from the raw weights."""
    a = _arrays(block)
    xt = x.reshape(-1, x.shape[-1])
    out = {}
    for pool in (("router", "experts"), ("vision_router", "vision_experts")):
        ids = _np_selection(xt, a[f"{pool[0]}.kernel"], a[f"{pool[0]}.bias"], VL.moe_k)
        out[pool[0]] = _oracle_pool(xt, a, pool, ids, VL.moe_norm_min)
    y = jnp.where(vision[:, None], out["vision_router"], out["router"]) + _oracle_shared(xt, a)
    return y.reshape(x.shape)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity", "dense"])
def test_vl_tokens_route_only_through_their_modality_pool(dispatch):
    block = _vl_block(moe_dispatch=dispatch, moe_capacity_factor=8.0)
    x = jnp.asarray(np.random.RandomState(3).randn(2, 12, VL.hidden_size), jnp.float32)
    modality = jnp.asarray(np.random.RandomState(4).randint(0, 3, (2, 12)), jnp.int32)  # 0 text, 1 image, 2 video
    mask = jnp.ones((2, 12), bool).at[1, -3:].set(False)
    y, stats = _vl_run(*nnx.split(block), x, mask, modality)
    vision = modality.reshape(-1) > 0
    np.testing.assert_allclose(y, _pool_reference(block, x, vision), atol=2e-6, rtol=1e-5)
    # statistics per modality [2, ...]: each pool counts its own real tokens only
    real = mask.reshape(-1)
    np.testing.assert_allclose(stats.num_tokens, [jnp.sum(real & ~vision), jnp.sum(real & vision)])
    np.testing.assert_allclose(stats.usage.sum(-1), VL.moe_k * stats.num_tokens)
    # a token's output does not depend on the other pool's weights
    changed = _vl_block(seed=9, moe_dispatch=dispatch, moe_capacity_factor=8.0)
    mixed = nnx.merge(*nnx.split(block))
    mixed.vision_router, mixed.vision_experts = changed.vision_router, changed.vision_experts
    y2, _ = _vl_run(*nnx.split(mixed), x, mask, modality)
    v = np.asarray(vision).reshape(2, 12)
    np.testing.assert_array_equal(np.asarray(y2)[~v], np.asarray(y)[~v])
    assert not np.allclose(np.asarray(y2)[v], np.asarray(y)[v])


def test_vl_without_type_ids_is_all_text():
    block = _vl_block(moe_gmm_impl="ragged_dot")  # the quickest grouped matmul to compile on CPU
    x = jnp.asarray(np.random.RandomState(5).randn(1, 8, VL.hidden_size), jnp.float32)
    y_none, st_none = _vl_run(*nnx.split(block), x, None, None)
    y_zero, st_zero = _vl_run(*nnx.split(block), x, None, jnp.zeros((1, 8), jnp.int32))
    np.testing.assert_allclose(y_none, y_zero, atol=1e-6)
    np.testing.assert_array_equal(st_none.usage, st_zero.usage)
    assert float(st_none.num_tokens[1]) == 0 and float(st_none.num_tokens[0]) == 8
