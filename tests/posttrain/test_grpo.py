"""GRPO / DAPO: group advantages, dynamic sampling's filter, the overlong penalty, the clipped token-level
objective's gradient (against hand derivatives and against separate unpacked forwards), and the RL loop's
rollouts, checkpoints and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.posttrain.grpo import (EXTRA_KEYS, GRPOConfig, group_advantages, grpo_loss, grpo_objective,
                                     informative_groups, overlong_penalty, pack_rollouts)
from ernie_jax.train.step import LossConfig, init_train_state, make_train_step
from random_weights import random_model

CFG = ernie_jax.get_preset("tiny", num_hidden_layers=2, max_position_embeddings=256)


def test_group_advantages_and_the_dynamic_sampling_filter():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 0.0, 0.0]])
    adv = group_advantages(r, eps=0.0 + 1e-6)
    for g in (0, 2):
        x = r[g]
        want = (x - x.mean()) / (np.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1)) + 1e-6)
        np.testing.assert_allclose(adv[g], want, rtol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_array_equal(informative_groups(r), [True, False, True])


def test_overlong_penalty_is_linear_over_the_buffer():
    cfg = GRPOConfig(max_new_tokens=10, overlong_buffer=4, overlong_penalty=0.5)
    np.testing.assert_allclose(overlong_penalty(np.array([3, 6, 7, 8, 10]), cfg), [0, 0, -0.125, -0.25, -0.5])
    assert not overlong_penalty(np.array([10]), GRPOConfig(max_new_tokens=10, overlong_penalty=0.0)).any()


def _rows(logp, adv, mask, old, ref=None, seg=None):
    b = {"loss_mask": jnp.asarray(mask), "advantages": jnp.asarray(adv), "old_logp": jnp.asarray(old),
         "ref_logp": jnp.asarray(old if ref is None else ref)}
    b["segment_ids"] = jnp.asarray(np.ones_like(mask, np.int32) if seg is None else seg)
    return jnp.asarray(logp), b


def test_clipped_objective_gradient_matches_hand_derivatives():
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.28)
    old = np.zeros((1, 7), np.float32)
    # ratios exp(logp - old): inside, above 1 + 0.28, below 1 - 0.2, inside, above, between 1.2 and 1.28 (inside
    # only with clip-higher), (masked)
    logp = np.log(np.array([[1.1, 1.5, 0.5, 0.9, 1.4, 1.25, 1.0]], np.float32))
    adv = np.array([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]], np.float32)
    lp, b = _rows(logp, adv, mask, old)
    g = np.asarray(jax.grad(lambda x: grpo_loss(cfg, x, b)[0])(lp))
    r = np.exp(logp - old)[0]
    # d/dlogp of -ratio*A / N where the unclipped term is the minimum, else 0 (the clipped term is constant)
    want = np.array([[-r[0] * 1, 0.0, 0.0, -r[3] * -1, -r[4] * -1, -r[5] * 1, 0.0]]) / 6
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    _, m = grpo_loss(cfg, lp, b)
    np.testing.assert_allclose(float(m["clip_fraction"]), 3 / 6)


def test_kl_term_and_sequence_aggregation():
    cfg = GRPOConfig(kl_coef=0.5, loss_agg="sequence")
    logp = np.array([[-1.0, -2.0, -0.5, -1.5]], np.float32)
    ref = np.array([[-1.2, -1.0, -0.5, -2.5]], np.float32)
    adv = np.array([[1.0, 1.0, -2.0, -2.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    seg = np.array([[1, 1, 2, 2]], np.int32)
    lp, b = _rows(logp, adv, mask, logp, ref, seg)
    loss, m = grpo_loss(cfg, lp, b)
    d = ref - logp
    kl = np.exp(d) - d - 1
    tok = -adv + 0.5 * kl  # ratio 1
    want = (tok[0, :2].mean() + tok[0, 2]) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), kl[0, :3].mean(), rtol=1e-6)
    token_loss, _ = grpo_loss(GRPOConfig(kl_coef=0.5), lp, b)
    np.testing.assert_allclose(float(token_loss), tok[0, :3].mean(), rtol=1e-6)


def test_packed_rollouts_mark_the_answers():
    b = pack_rollouts([[1, 5, 6], [1, 7]], [[9, 10, 2], [11]], [0.5, -1.0], rows=1, seq_len=12)
    np.testing.assert_array_equal(b["tokens"][0, :7], [1, 5, 6, 9, 10, 1, 7])
    np.testing.assert_array_equal(b["targets"][0, :7], [5, 6, 9, 10, 2, 7, 11])
    np.testing.assert_array_equal(b["loss_mask"][0, :7], [0, 0, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(b["advantages"][0, :7], [0, 0, 0.5, 0.5, 0.5, 0, -1.0])
    np.testing.assert_array_equal(b["segment_ids"][0, :8], [1, 1, 1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(b["positions"][0, :7], [0, 1, 2, 3, 4, 0, 1])
    with pytest.raises(ValueError, match="do not fit 1 rows of 12"):
        pack_rollouts([[1] * 8] * 2, [[2] * 3] * 2, [0.0, 0.0], rows=1, seq_len=12)


def test_grpo_step_is_reinforce_over_separate_forwards():
    """At ratio 1 (old = current weights) one SGD step of the token-level objective moves the weights by
    lr * sum_i A_i sum_t grad log p(answer_i,t) / (answer tokens), each answer run alone, unpacked."""
    model = random_model(CFG, seed=5, std=0.3)
    prompts, answers, adv = [[1, 5, 6, 7], [1, 8], [1, 9, 9]], [[20, 21, 2], [30], [40, 41]], [1.0, -0.5, 2.0]
    b = pack_rollouts(prompts, answers, adv, rows=2, seq_len=8)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def seq_logp(params, p, a):
        ids = jnp.asarray(p + a)[None]
        lp = jax.nn.log_softmax(nnx.merge(graphdef, params, rest)(ids).logits[0].astype(jnp.float32))
        t = np.arange(len(p), len(p) + len(a))
        return jnp.sum(lp[t - 1, jnp.asarray(a)])

    old = {k: jnp.asarray(v) for k, v in b.items()}
    from ernie_jax.posttrain.grpo import token_logps
    old_logp = np.asarray(token_logps(model, old)[0])
    batch = dict(b, old_logp=old_logp, ref_logp=old_logp)
    lr, n_tok = 0.1, sum(len(a) for a in answers)
    tx = optax.sgd(lr)
    state = init_train_state(model, tx, ema=False)
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(lr), LossConfig(mtp_coef=0.0),
                                   objective=grpo_objective(GRPOConfig()), batch_keys=EXTRA_KEYS))
    new, metrics = step(state, {k: jnp.asarray(v)[None] for k, v in batch.items()})
    oracle = jax.jit(jax.grad(lambda prm: -sum(a * seq_logp(prm, p, x) for p, x, a in zip(prompts, answers, adv))
                              / n_tok))
    grads = nnx.to_pure_dict(oracle(params))
    flat = jax.tree_util.tree_leaves_with_path
    for (path, g), (_, p0), (_, p1) in zip(flat(grads), flat(nnx.to_pure_dict(params)), flat(new.params)):
        got, want = np.asarray(p1 - p0), -lr * np.asarray(g)
        assert np.linalg.norm(want) > 0, path
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), path
    assert float(metrics["clip_fraction"]) == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    from ernie_jax.data.tokenizer import SentencePieceTokenizer
    from ernie_jax.synthetic.text import ensure_default_data
    return SentencePieceTokenizer(str(ensure_default_data()["tokenizer"]))


def test_loop_filters_uniform_groups_checkpoints_and_resumes(tmp_path, tokenizer):
    """Rewards: 1 for an answer of even length. Two steps, then a restart for a third, equal the same three
    steps run at once: the same prompts and answers in the same order, the same rollout count and weights;
    dynamic sampling drops the groups whose answers all scored the same."""
    from ernie_jax.posttrain.rl_loop import train_grpo
    from ernie_jax.train.loop import TrainConfig
    from ernie_jax.train.optimizer import OptimizerConfig

    model_cfg = ernie_jax.get_preset("tiny", num_hidden_layers=1, max_position_embeddings=256)
    prompts = [{"ids": [1, 10 + i, 20 + i]} for i in range(12)]
    log = {"a": [], "b": []}

    def reward_fn_for(key):
        def reward_fn(examples, texts):
            log[key].append([(tuple(e["ids"]), t) for e, t in zip(examples, texts)])
            r = np.asarray([float(len(t) > 0 and len(t) % 2 == 0) for t in texts], np.float32)
            return r, {"reward/even_mean": float(r.mean())}
        return reward_fn

    grpo = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=4, overlong_buffer=1, max_sampling_rounds=3)
    cfg = lambda steps: TrainConfig(model=model_cfg, total_steps=steps, log_every_steps=1,  # noqa: E731
                                    checkpoint_every_steps=1, async_checkpoints=False,
                                    optimizer=OptimizerConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1))
    kw = dict(encode=lambda e: e["ids"], progress=False)
    out = train_grpo(cfg(2), grpo, str(tmp_path / "a"), prompts, reward_fn_for("a"), tokenizer, **kw)
    assert out["step"] == 2 and out["rollouts"] == sum(len(x) for x in log["a"])
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        assert {"reward/even_mean", "filtered_fraction", "answer_length", "kl", "entropy", "rollouts"} <= set(x)
        assert 0 <= x["filtered_fraction"] < 1
    resumed = train_grpo(cfg(3), grpo, str(tmp_path / "a"), prompts, reward_fn_for("a"), tokenizer, **kw)
    whole = train_grpo(cfg(3), grpo, str(tmp_path / "b"), prompts, reward_fn_for("b"), tokenizer, **kw)
    assert resumed["step"] == whole["step"] == 3
    assert log["a"] == log["b"] and resumed["rollouts"] == whole["rollouts"]
    for x, y in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(whole["state"].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    # the filtered fraction each step logs is the share of its drawn groups whose rewards were all equal
    steps = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    draws, drawn = iter(log["b"]), 0
    for x in steps:
        uniform = groups = 0
        while drawn < x["rollouts"]:
            d = next(draws)
            drawn += len(d)
            r = np.asarray([float(len(t) > 0 and len(t) % 2 == 0) for _, t in d]).reshape(-1, 4)
            uniform, groups = uniform + int((r == r[:, :1]).all(1).sum()), groups + len(r)
        assert x["filtered_fraction"] == pytest.approx(uniform / groups)
    assert any(x["filtered_fraction"] > 0 for x in steps)


def test_a_run_that_never_finds_a_signal_aborts_with_a_clear_error(tmp_path, tokenizer):
    """Rewards all equal: every group is uniform in every draw; after max_nonfinite such steps the loop stops
    with an error naming the cause instead of sampling forever."""
    from ernie_jax.posttrain.rl_loop import train_grpo
    from ernie_jax.train.loop import TrainConfig, TrainingAborted
    from ernie_jax.train.optimizer import OptimizerConfig

    cfg = TrainConfig(model=ernie_jax.get_preset("tiny", num_hidden_layers=1, max_position_embeddings=256),
                      total_steps=3, max_nonfinite=2, async_checkpoints=False,
                      optimizer=OptimizerConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1))
    grpo = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=3, overlong_buffer=0, max_sampling_rounds=2,
                      overlong_penalty=0.0)
    calls = []

    def reward_fn(examples, texts):
        calls.append(len(texts))
        return np.zeros(len(texts), np.float32), {}

    with pytest.raises(TrainingAborted, match=r"2 steps in a row found no group whose answers' rewards differ"):
        train_grpo(cfg, grpo, str(tmp_path), [{"ids": [1, 5, 6]}], reward_fn, tokenizer, encode=lambda e: e["ids"],
                   progress=False)
    assert len(calls) == 4  # two steps of two draws each
