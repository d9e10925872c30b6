import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ernie_jax import get_preset
from ernie_jax.losses import token_balanced_loss, token_cross_entropy
from ernie_jax.train.ema import EMAConfig
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer
from ernie_jax.train.step import LossConfig, init_train_state, make_train_step
from random_weights import random_model


def _batch(a, b, s, seed=0, vocab=128):
    r = np.random.RandomState(seed)
    tok = r.randint(3, vocab, (a, b, s + 1))
    mask = (r.rand(a, b, s) > 0.3).astype(np.int32)
    return {"tokens": jnp.asarray(tok[..., :-1]), "targets": jnp.asarray(tok[..., 1:]), "loss_mask": jnp.asarray(mask)}


def test_token_balanced_loss_gradient_and_value():
    """Value: per-token mean over supervised tokens. Gradient: d/dce = mask / (B * S), a closed form."""
    ce = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]])
    value, mean = token_balanced_loss(ce, mask)
    assert float(value) == pytest.approx((1 + 2 + 5) / 3) and float(mean) == pytest.approx(8 / 3)
    g = jax.grad(lambda c: token_balanced_loss(c, mask)[0])(ce)
    np.testing.assert_allclose(np.asarray(g), np.asarray(mask) / 8.0)
    logits = jnp.asarray(np.random.RandomState(0).randn(2, 3, 5))
    t = jnp.asarray([[0, 1, 2], [3, 4, 0]])
    np.testing.assert_allclose(np.asarray(token_cross_entropy(logits, t)),
                               -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(t)[..., None],
                                                   -1)[..., 0], rtol=1e-6)


@pytest.fixture(scope="module")
def setup():
    # ragged_dot: the quickest grouped matmul to compile on CPU (each backend has its own tests)
    cfg = get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=1, moe_gmm_impl="ragged_dot")
    model = random_model(cfg, seed=0, correction_biases=False)  # host-drawn: no initialiser to compile
    tx, sched = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 100)
    return model, tx, sched


def _sgd(lr=1.0):
    """Plain SGD as the step's optimizer: the update is -lr * gradient, so a gradient scale shows (Adam's
    first update is ~lr * sign(g) whatever the scale)."""
    return optax.sgd(lr), optax.constant_schedule(lr)


def _functional(model):
    """(params pure dict, f(params, **kw) -> the model's output) for gradients by jax.grad."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p, *args, **kw):
        state = jax.tree.map(lambda x: x, params)
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state, rest)(*args, **kw)

    return nnx.to_pure_dict(params), f


def _assert_tree_close(a, b, **tol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def test_grad_accumulation_averages_micro_batch_gradients(setup):
    """Two micro-batches of 2 rows: the SGD update is minus the mean of the two micro-batches' gradients of
    sum(mask * ce) / (rows * S), computed here by jax.grad of the model (token-balanced: each micro-batch
    divides by its slot count, the accumulation averages); one micro-batch of the 4 rows gives the same."""
    model, _, _ = setup
    tx, sched = _sgd()
    step = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.0)))
    b = _batch(2, 2, 8)
    params, f = _functional(model)

    def micro_loss(p, i):
        logp = jax.nn.log_softmax(f(p, b["tokens"][i]).logits, axis=-1)
        nll = -jnp.take_along_axis(logp, b["targets"][i][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * b["loss_mask"][i]) / nll.size

    grads = jax.jit(lambda p: jax.tree.map(lambda g0, g1: (g0 + g1) / 2, jax.grad(micro_loss)(p, 0),
                                           jax.grad(micro_loss)(p, 1)))(params)
    want = jax.tree.map(lambda p, g: p - g, params, grads)
    s2, m2 = step(init_train_state(model, tx, ema=False), b)
    _assert_tree_close(s2.params, want, rtol=1e-5, atol=1e-7)
    s1, m1 = step(init_train_state(model, tx, ema=False), jax.tree.map(lambda x: x.reshape(1, 4, 8), b))
    _assert_tree_close(s1.params, want, rtol=1e-5, atol=1e-7)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)


def test_mtp_loss_in_the_step():
    """With MTP depth 1 the step adds mtp_coef * (masked mean CE of the depth-1 logits against the targets one
    further ahead, never across a document boundary): metric and SGD update against that loss written out
    here (shifted inputs and targets built by hand, not with `mtp_inputs` / `mtp_targets`)."""
    model = random_model(get_preset("tiny-test", num_nextn_predict_layers=1), seed=0)
    tx, sched = _sgd()
    b = _batch(1, 2, 8, seed=3)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], np.int32)  # packed; padding = 0
    b["segment_ids"] = jnp.asarray(seg[None])
    b["loss_mask"] = b["loss_mask"] * (b["segment_ids"] > 0)
    tok, tgt, msk = (np.asarray(b[k][0]) for k in ("tokens", "targets", "loss_mask"))
    shifted = np.concatenate([tok[:, 1:], np.zeros((2, 1), tok.dtype)], axis=1)  # depth 1 sees the input shifted by 1
    tgt1 = np.concatenate([tgt[:, 1:], np.zeros((2, 1), tgt.dtype)], axis=1)
    same_doc = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((2, 1), bool)], axis=1)
    msk1 = np.concatenate([msk[:, 1:], np.zeros((2, 1), msk.dtype)], axis=1).astype(bool) & same_doc
    params, f = _functional(model)

    def mtp_only(p):
        out = f(p, b["tokens"][0], segment_ids=b["segment_ids"][0], attention_mask=b["segment_ids"][0] != 0,
                mtp_input_ids=jnp.asarray(shifted[None]))
        logp = jax.nn.log_softmax(out.mtp_logits[0], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(tgt1)[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * msk1) / msk1.sum()

    state = init_train_state(model, tx, ema=False)
    with_mtp = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.5)))(state, b)
    without = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.0)))(state, b)
    assert float(with_mtp[1]["mtp_loss"]) == pytest.approx(float(jax.jit(mtp_only)(params)), rel=1e-5)
    assert "mtp_loss" not in without[1]
    # SGD: the difference of the two updates is -0.5 * grad of the MTP loss
    diff = jax.tree.map(lambda a, c: a - c, with_mtp[0].params, without[0].params)
    want = jax.tree.map(lambda g: -0.5 * g, jax.jit(jax.grad(mtp_only))(params))
    _assert_tree_close(diff, want, rtol=2e-4, atol=1e-6)
    assert float(optax.tree.norm(want["mtp"])) > 0


def test_router_lr_multiplier_scales_router_updates_only(setup):
    """Same state and batch, router_lr_multiplier 1 vs 3: the router kernels move 3x as far (AdamW's first
    update, weight decay included), every other parameter by exactly the same amount."""
    model, _, _ = setup
    b = _batch(1, 2, 8)
    moved = {}
    for mult in (1.0, 3.0):
        tx, sched = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0, router_lr_multiplier=mult), 10)
        state = init_train_state(model, tx, ema=False)
        new, _ = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.0)))(state, b)
        moved[mult] = jax.tree.map(lambda a, c: np.asarray(a) - np.asarray(c), new.params, state.params)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(moved[1.0])[0])
    routers = 0
    for path, d3 in jax.tree_util.tree_flatten_with_path(moved[3.0])[0]:
        d1 = flat1[path]
        if "router" in jax.tree_util.keystr(path):
            routers += 1
            assert np.abs(d1).max() > 0
            np.testing.assert_allclose(d3, 3.0 * d1, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(d3, d1, err_msg=jax.tree_util.keystr(path))
    assert routers == 1


@pytest.fixture(scope="module")
def ema_step(setup):
    """The step with an EMA and the correction-bias update (buffers that a step changes), compiled once."""
    model, tx, sched = setup
    return jax.jit(make_train_step(model, tx, sched, LossConfig(aux_free_coef=1e-2), ema_cfg=EMAConfig(decay=0.75)))


def test_ema_follows_the_updated_params(setup, ema_step):
    """EMA after a step = decay * EMA before + (1 - decay) * the new params, in fp32."""
    model, tx, sched = setup
    step = ema_step
    state = init_train_state(model, tx, ema=True)
    ema0 = jax.tree.map(lambda p: np.asarray(p, np.float32) + 1.0, state.params)  # an EMA apart from the params
    state = state.replace(ema=jax.tree.map(jnp.asarray, ema0))
    new, _ = step(state, _batch(1, 2, 8))
    _assert_tree_close(new.ema, jax.tree.map(lambda e, p: 0.75 * e + 0.25 * np.asarray(p), ema0, new.params),
                       rtol=1e-6, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted(setup, ema_step):
    model, tx, _ = setup
    step = ema_step
    state = init_train_state(model, tx, ema=True)
    state, _ = step(state, _batch(1, 2, 8))
    before = jax.tree.map(np.asarray, (state.params, state.buffers, state.opt_state, state.ema))
    bad = dict(state.params)
    bad["embed"] = state.params["embed"].at[5, 0].set(jnp.nan)  # a NaN weight -> NaN loss and gradients
    nan_state = state.replace(params=bad)
    after, metrics = step(nan_state, _batch(1, 2, 8, seed=1))
    assert int(metrics["skipped"]) == 1 and int(after.nonfinite_run) == 1 and int(after.nonfinite_total) == 1
    assert int(after.step) == int(state.step)
    for a, b in zip(jax.tree.leaves((after.buffers, after.opt_state, after.ema)), jax.tree.leaves(before[1:])):
        np.testing.assert_array_equal(np.asarray(a), b)
    after2, m2 = step(state, _batch(1, 2, 8, seed=1))  # a finite step resets the run
    assert int(m2["skipped"]) == 0 and int(after2.nonfinite_run) == 0 and int(after2.step) == int(state.step) + 1


def test_aux_free_bias_moves_and_loss_decreases(setup):
    model, tx, sched = setup
    step = jax.jit(make_train_step(model, tx, sched, LossConfig(aux_free_coef=1e-3, aux_coef=1e-3, z_coef=1e-4,
                                                                orth_coef=1e-3, orth_in_loss=False)))
    state = init_train_state(model, tx, ema=False)
    b = _batch(1, 4, 16)
    losses = []
    for _ in range(8):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    bias = np.asarray(state.buffers["decoder"]["stacks"][1]["layers"]["mlp"]["router"]["bias"])
    # 8 sign steps of 1e-3: every entry a whole multiple of the step, at least one moved
    assert np.abs(bias).max() > 0 and np.allclose(bias * 1e3, np.round(bias * 1e3), atol=1e-3)
    assert losses[-1] < losses[0] - 0.5


def test_aux_free_update_through_the_step_per_stack():
    """Two one-layer MoE stacks (layers 1 and 3), two micro-batches, lr 0: each stack's router bias moves by
    coef * sign(mean - usage) of its own layer's usage summed over both micro-batches (the forward's
    counts): over-used experts down, under-used up."""
    cfg = get_preset("tiny-moe-test", num_hidden_layers=4, moe_layer_start_index=0, moe_layer_interval=2,
                     moe_gmm_impl="ragged_dot")
    model = random_model(cfg, seed=1, correction_biases=False)
    tx, sched = _sgd(0.0)
    b = _batch(2, 2, 8, seed=5)
    state, m = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.0, aux_free_coef=0.25)))(
        init_train_state(model, tx, ema=False), b)
    forward_usage = jax.jit(lambda t: model(t).moe_stats.usage)
    usage = sum(np.asarray(forward_usage(b["tokens"][i])) for i in range(2))  # [2 MoE layers, E]
    assert not np.array_equal(usage[0], usage[1])
    for stack, layer in ((1, 0), (3, 1)):
        bias = np.asarray(state.buffers["decoder"]["stacks"][stack]["layers"]["mlp"]["router"]["bias"])[0]
        over = usage[layer] > usage[layer].mean()
        assert over.any() and (bias[over] == -0.25).all() and (bias[~over & (usage[layer] < usage[layer].mean())]
                                                                == 0.25).all()
        np.testing.assert_array_equal(bias, 0.25 * np.sign(usage[layer].mean() - usage[layer]))
    _assert_tree_close(state.params, nnx.to_pure_dict(nnx.state(model, nnx.Param)), rtol=0, atol=0)
