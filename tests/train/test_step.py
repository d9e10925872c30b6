import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax import get_preset
from ernie_jax.losses import token_balanced_loss, token_cross_entropy
from ernie_jax.model import create_model
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer
from ernie_jax.train.step import LossConfig, init_train_state, make_train_step


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
    cfg = get_preset("tiny-moe-test", num_hidden_layers=2, moe_layer_start_index=1)
    model = create_model(cfg, seed=0)
    tx, sched = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=0), 100)
    return model, tx, sched


def test_grad_accumulation_equals_one_big_batch(setup):
    """Two micro-batches of 2 rows give the update of one micro-batch of 4 rows (token-balanced: each
    micro-batch divides by its slot count, the accumulation averages)."""
    model, tx, sched = setup
    step = jax.jit(make_train_step(model, tx, sched, LossConfig(mtp_coef=0.0)))
    b = _batch(2, 2, 8)
    s2, m2 = step(init_train_state(model, tx, ema=False), b)
    s1, m1 = step(init_train_state(model, tx, ema=False), jax.tree.map(lambda x: x.reshape(1, 4, 8), b))
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)  # Adam amplifies float noise of tiny gradients


def test_nonfinite_step_is_skipped_and_counted(setup):
    model, tx, sched = setup
    step = jax.jit(make_train_step(model, tx, sched, LossConfig(aux_free_coef=1e-2, ema_decay=0.9)))
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
