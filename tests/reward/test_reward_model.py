"""The discriminative reward model (RDRM): its padded, batched score is the head applied to the backbone's
hidden state at the unpadded sequence's last token, the pairwise loss is Bradley-Terry, and training on
preference pairs of the sort task makes it rank held-out chosen answers above rejected ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.posttrain.chat import render
from ernie_jax.reward import RewardModel, RewardSystem, pairwise_loss, train_reward_model
from ernie_jax.reward.reward_model import pad_batch
from ernie_jax.synthetic import chat_tasks
from ernie_jax.synthetic.text import ensure_default_data
from random_weights import random_model

CFG = ernie_jax.get_preset("tiny", num_hidden_layers=2)


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(str(ensure_default_data()["tokenizer"]))


def _conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@functools.partial(jax.jit, static_argnums=0)
def _last_hidden(graphdef, state, ids):
    """The backbone alone on one unpadded sequence [1, S] (no mask): its final hidden state [H] at the end."""
    return nnx.merge(graphdef, state)(ids).hidden_states[0, -1]


def _alone(rm, ids):
    """Oracle: the backbone on the unpadded sequence, its last hidden state through the head's kernel and bias."""
    h = np.asarray(_last_hidden(*nnx.split(rm.backbone), jnp.asarray(ids)[None]), np.float64)
    return float(h @ np.asarray(rm.head.kernel[...], np.float64)[:, 0] + float(rm.head.bias[...][0]))


def test_score_is_head_at_last_real_token(tok):
    rm = RewardModel(random_model(CFG, seed=1, std=0.2), rngs=nnx.Rngs(0))
    convs = [_conv("12+34=", "46"), _conv("sort 84331845 =", "13344588"), _conv("reverse abcdefghijklmnop =", "x"),
             _conv("after 9 comes", "10 and that is all there is to say about it, really, truly.")]
    seqs = [render(c, tok).ids for c in convs]
    want = np.array([_alone(rm, s) for s in seqs])
    ids, mask = pad_batch(seqs, rows=4, length=64)
    got = np.asarray(rm.score(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rm.score_conversations(convs, tok, max_batch=3), want, rtol=1e-4, atol=1e-5)
    assert np.ptp(want) > 0.1  # distinct rewards: reading the wrong position would show

    examples = [{"prompt": c[0]["content"]} for c in convs]
    batch = RewardSystem([rm.as_source(tok, normalize=False)])(examples, [c[1]["content"] for c in convs])
    np.testing.assert_allclose(batch.raw["rdrm"], want, rtol=1e-4, atol=1e-5)
    blank = RewardSystem([rm.as_source(tok)])(examples[:2], ["46", "  "])
    assert blank.failures["rdrm"] == {"batch raised ChatFormatError": 1, "raised ChatFormatError": 1}


def test_pairwise_loss_is_bradley_terry():
    r_c, r_r = jnp.array([2.0, -1.0, 0.5]), jnp.array([0.0, 1.0, 0.5])
    want = np.mean([np.log1p(np.exp(-d)) for d in (2.0, -2.0, 0.0)])
    assert float(pairwise_loss(r_c, r_r)) == pytest.approx(want, rel=1e-6)
    g = jax.grad(lambda c: pairwise_loss(c, r_r))(r_c)
    assert (np.asarray(g) < 0).all()  # raising the chosen reward lowers the loss


def test_validation(tok):
    rm = RewardModel(random_model(CFG, seed=0), rngs=nnx.Rngs(0))
    pairs = chat_tasks.preference_pairs("train", 4, 0)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 4\].* got 8"):
        train_reward_model(rm, pairs, tok, steps=1, batch_size=8)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        train_reward_model(rm, pairs, tok, steps=0, batch_size=2)
    with pytest.raises(ValueError, match="longest conversation has .* tokens, more than seq_len=8"):
        train_reward_model(rm, pairs, tok, steps=1, batch_size=2, seq_len=8)


def _sort_pairs(split, n, seed):
    """n pairs of the sort task: the chosen answer is the sorted digits, the rejected one has two swapped,
    a preference a small model can learn from the answer alone within a few dozen steps."""
    return [p for p in chat_tasks.preference_pairs(split, 12 * n, seed) if p["task"] == "sort"][:n]


def _accuracy(rm, pairs, tok):
    r_c = rm.score_conversations([p["chosen"] for p in pairs], tok)
    r_r = rm.score_conversations([p["rejected"] for p in pairs], tok)
    return float(np.mean(r_c > r_r))


def test_training_ranks_heldout_chosen_above_rejected(tok):
    rm = RewardModel(random_model(CFG, seed=1), rngs=nnx.Rngs(1))
    train, heldout = _sort_pairs("train", 256, 0), _sort_pairs("heldout", 128, 1)
    assert len(train) == 256 and len(heldout) == 128
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    before = _accuracy(rm, heldout, tok)
    assert before < 0.5  # this initialisation ranks them the wrong way round: what follows is training
    m = train_reward_model(rm, train, tok, steps=40, lr=1e-3, batch_size=16, seed=0)
    assert m["loss"].shape == (40,) and np.isfinite(m["loss"]).all()
    assert m["loss"][-10:].mean() < 0.5 * m["loss"][:10].mean()
    after = _accuracy(rm, heldout, tok)
    assert after > 0.9, (before, after)
