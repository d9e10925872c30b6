"""DPO on shared-question rows: one packed forward scores each reply exactly as its own unpacked sequence
would, the losses follow their formulas, and a DPO step's gradient is the gradient of the formula computed
from separate forwards (SGD, so no optimizer hides a scale)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.data import DataConfig, DataError
from ernie_jax.posttrain.chat import render
from ernie_jax.posttrain.dpo import DPOConfig, WithReference, dpo_objective, pair_logps, preference_loss
from ernie_jax.posttrain.preference_pipeline import EXTRA_KEYS, make_preference_pipeline
from ernie_jax.synthetic.text import ensure_default_data
from ernie_jax.train.step import LossConfig, init_train_state, make_train_step
from random_weights import random_model

CFG = ernie_jax.get_preset("tiny", num_hidden_layers=2, max_position_embeddings=256)
PAIRS = 4


def _conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


RECORDS = [
    {"chosen": _conv("12+34=", "46"), "rejected": _conv("12+34=", "47")},
    {"chosen": _conv("reverse abc =", "cba"), "rejected": _conv("reverse abc =", "cab")},
    {"chosen": [{"role": "system", "content": "Be brief."}] + _conv("sort 312 =", "123"),
     "rejected": [{"role": "system", "content": "Be brief."}] + _conv("sort 312 =", "1 2 3 and more words")},
    {"chosen": _conv("after 9 comes", "10"), "rejected": _conv("after 9 comes", "11")},
    {"chosen": _conv("count a in abca =", "2"), "rejected": _conv("count a in abca =", "3")},
]


@pytest.fixture(scope="module")
def tokenizer_path():
    return str(ensure_default_data()["tokenizer"])


def _data_cfg(path, tok, **kw):
    return DataConfig.from_dict(dict(sources=[{"path": str(path), "kind": "preference"}], tokenizer=tok, seq_len=84,
                                     global_batch_size=2, max_docs_per_row=PAIRS, **kw))


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tokenizer_path):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    it = make_preference_pipeline(DataConfig.from_dict(
        dict(sources=[{"path": str(path), "kind": "preference"}], tokenizer=tokenizer_path, seq_len=84,
             global_batch_size=2, max_docs_per_row=PAIRS, num_epochs=1)))
    b = next(it)
    # the pipeline's global order shuffles the records: sample index -> record index
    b["record"] = np.vectorize(lambda g: it.loader.order(int(g))[2] if g >= 0 else -1)(b["sample_ids"])
    return b


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3, std=0.3)


@pytest.fixture(scope="module")
def oracle(model, tokenizer_path):
    return _oracle_logps(model, tokenizer_path)


def _oracle_logps(model, tokenizer_path):
    """Per record: the summed log-probabilities of the chosen and rejected replies, each conversation run on its
    own (no packing, default positions, plain causal mask), scored where its loss mask is 1."""
    from ernie_jax.data.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer(tokenizer_path)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    out = []
    for rec in RECORDS:
        sums = []
        for key in ("chosen", "rejected"):
            r = render(rec[key], tok)
            ids = jnp.asarray(r.ids)[None]
            logits = np.asarray(forward(state, ids)[0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            t = np.arange(1, len(r.ids))
            sums.append(float(np.sum(logp[t - 1, r.ids[t]] * r.loss_mask[t])))
        out.append(sums)
    return np.asarray(out)


def _by_record(batch, values):
    """[R, P] per-pair values -> {record index: value}."""
    return {int(g): values[r, j] for r, row in enumerate(batch["record"]) for j, g in enumerate(row) if g >= 0}


def test_packed_rows_score_each_reply_as_its_own_sequence(batch, model, oracle):
    assert (batch["segment_ids"].max(1) >= 2).all(), "each row should hold several pairs"
    c, r, n_c, n_r = pair_logps(model(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                                      segment_ids=jnp.asarray(batch["segment_ids"]),
                                      attention_mask=jnp.asarray(batch["segment_ids"] != 0),
                                      kv_visible_until=jnp.asarray(batch["kv_visible_until"])).logits,
                                {k: jnp.asarray(v) for k, v in batch.items()}, PAIRS)
    want = oracle
    got_c, got_r = _by_record(batch, np.asarray(c)), _by_record(batch, np.asarray(r))
    assert sorted(got_c) == list(range(len(RECORDS)))
    for g in got_c:
        np.testing.assert_allclose([got_c[g], got_r[g]], want[g], rtol=1e-4, atol=1e-4)
    assert not np.allclose(want[:, 0], want[:, 1])


def test_without_the_shared_question_mask_the_rejected_reply_sees_the_chosen_one(batch, model, oracle):
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    _, r, _, _ = pair_logps(model(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"],
                                  attention_mask=b["segment_ids"] != 0).logits, b, PAIRS)
    want = oracle[:, 1]
    got = _by_record(batch, np.asarray(r))
    assert max(abs(got[g] - want[g]) for g in got) > 1e-2


def test_losses_follow_their_formulas():
    pi_c, pi_r = jnp.array([[-3.0, -5.0]]), jnp.array([[-4.0, -2.0]])
    ref_c, ref_r = jnp.array([[-3.5, -5.0]]), jnp.array([[-3.0, -2.5]])
    n_c, n_r = jnp.array([[2.0, 0.0]]), jnp.array([[4.0, 0.0]])  # the second pair is padding
    loss, m = preference_loss(DPOConfig(beta=0.5), pi_c, pi_r, n_c, n_r, ref_c, ref_r)
    z = 0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0))
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-z)), rtol=1e-6)
    assert float(m["reward_accuracy"]) == 1.0 and float(m["pairs"]) == 1.0
    loss, _ = preference_loss(DPOConfig(loss="simpo", beta=2.0, gamma=0.3), pi_c, pi_r, n_c, n_r)
    z = 2.0 * (-3.0 / 2 - -4.0 / 4) - 0.3
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-z)), rtol=1e-6)
    loss, m = preference_loss(DPOConfig(loss="simpo", beta=2.0, gamma=0.3, nll_coef=0.5), pi_c, pi_r, n_c, n_r)
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-z)) + 0.5 * 3.0 / 2, rtol=1e-6)  # chosen: -3 over 2


def test_dpo_step_gradient_is_the_formulas_gradient(batch, model, oracle, tokenizer_path):
    """One SGD step of the DPO objective (reference = the initial weights) moves the weights by -lr times the
    gradient of the DPO loss written over separate, unpacked forwards."""
    cfg, lr = DPOConfig(beta=0.7), 0.1
    ref = WithReference(iter([batch]), model, PAIRS)
    b = next(ref)
    tx = optax.sgd(lr)
    state = init_train_state(model, tx, ema=False)
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(lr), LossConfig(mtp_coef=0.0),
                                   objective=dpo_objective(cfg, PAIRS), batch_keys=cfg.batch_keys))
    new, metrics = step(state, {k: jnp.asarray(v)[None] for k, v in b.items() if k not in ("sample_ids", "record")})

    from ernie_jax.data.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer(tokenizer_path)
    seqs = [[render(rec[k], tok) for k in ("chosen", "rejected")] for rec in RECORDS]
    ref_sums = oracle
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def oracle_loss(params):
        m = nnx.merge(graphdef, params, rest)
        losses = []
        for (c, r), (rc, rr) in zip(seqs, ref_sums):
            s = []
            for x in (c, r):
                lp = jax.nn.log_softmax(m(jnp.asarray(x.ids)[None]).logits[0].astype(jnp.float32))
                t = jnp.arange(1, len(x.ids))
                s.append(jnp.sum(lp[t - 1, jnp.asarray(x.ids)[1:]] * jnp.asarray(x.loss_mask)[1:]))
            losses.append(jax.nn.softplus(-cfg.beta * ((s[0] - rc) - (s[1] - rr))))
        return jnp.mean(jnp.stack(losses))

    want_loss, grads = jax.jit(jax.value_and_grad(oracle_loss))(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-4)  # policy = reference at step 0
    old, got = nnx.to_pure_dict(params), new.params
    flat = jax.tree_util.tree_leaves_with_path
    for (path, g), (_, p0), (_, p1) in zip(flat(nnx.to_pure_dict(grads)), flat(old), flat(got)):
        step_got, step_want = np.asarray(p1 - p0), -lr * np.asarray(g)
        assert np.linalg.norm(step_want) > 0, path
        assert np.linalg.norm(step_got - step_want) <= 1e-3 * np.linalg.norm(step_want), path


def test_a_pair_whose_prompts_differ_is_an_error_naming_the_record(tmp_path, tokenizer_path):
    bad = dict(RECORDS[1], rejected=_conv("reverse abd =", "dba"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], bad]))
    it = make_preference_pipeline(_data_cfg(path, tokenizer_path, num_epochs=1))
    with pytest.raises(DataError, match=r"pairs.jsonl.*record 1.*different prompts"):
        next(it)
    skip = make_preference_pipeline(_data_cfg(path, tokenizer_path, num_epochs=1, on_bad_record="skip"))
    b = next(skip)
    assert skip.get_state()["skipped"] == {"preference": 1}
    assert [skip.loader.order(int(g))[2] for g in b["sample_ids"].ravel() if g >= 0] == [0]  # the good record


def test_extra_keys_are_per_position(batch):
    for k in EXTRA_KEYS:
        assert batch[k].shape == batch["tokens"].shape
