"""The reference-based judge (RLLM): its batched, padded scores are P(yes) / (P(yes) + P(no)) of each judge
prompt run alone and unpadded through the model (a hand-written softmax over the next-token logits after the
prompt's last token), it compiles once per padding bucket, and it plugs into the reward system."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.posttrain import chat
from ernie_jax.reward import ReferenceJudge, RewardSystem
from ernie_jax.reward.judge import DEFAULT_TEMPLATE, _yes_probability
from ernie_jax.synthetic.text import ensure_default_data
from random_weights import random_model

CFG = ernie_jax.get_preset("tiny", num_hidden_layers=2)
QUESTIONS = ["12+34=", "sort 84331845 =", "Mo has 7 stamps. Mo gets 18 more. Now Mo has", "after 9 comes", "1+1=",
             "reverse abcdefghijklmnop =", "count a in aab ="]
REFERENCES = ["46", "13344588", "25 stamps.", "10", "2", "ponmlkjihgfedcba", "2"]
RESPONSES = ["46", "83344518", "it is 25 stamps, i think, because 7 and 18 make 25 stamps in all.", "11", "2",
             "ponmlkjihgfedcba", "two"]


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(str(ensure_default_data()["tokenizer"]))


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3, std=0.2)  # a larger std than the default: distinct scores


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, state, ids):
    """The plain forward of one unpadded sequence [1, S] (no mask): the logits [V] after its last token."""
    return nnx.merge(graphdef, state)(ids).logits[0, -1]


def _oracle(model, tok, q, ref, resp):
    """The judge's probability computed alone: the prompt unpadded, the full logits, a softmax by hand."""
    content = DEFAULT_TEMPLATE.format(question=q, reference=ref, response=resp)
    ids = chat.prompt([{"role": "user", "content": content}], tok)
    logits = np.asarray(_last_logits(*nnx.split(model), jnp.asarray(ids)[None]), np.float64)
    y, n = logits[tok.encode(" yes")[0]], logits[tok.encode(" no")[0]]
    return np.exp(y) / (np.exp(y) + np.exp(n))


def test_batched_padded_scores_equal_each_prompt_alone(model, tok):
    judge = ReferenceJudge(model, tok, max_batch=4)  # 7 prompts: two groups, the second padded to 4 rows
    lengths = [len(judge.prompt_ids(*t)) for t in zip(QUESTIONS, REFERENCES, RESPONSES)]
    assert len({-(-n // 16) for n in lengths}) >= 2  # several length buckets, rows padded within each
    got = judge.score(QUESTIONS, REFERENCES, RESPONSES)
    want = np.array([_oracle(model, tok, *t) for t in zip(QUESTIONS, REFERENCES, RESPONSES)])
    assert got.shape == (7,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.ptp(want) > 0.05 and ((want > 0) & (want < 1)).all()  # the scores differ: the check has teeth


def test_answer_tokens(tok, model):
    judge = ReferenceJudge(model, tok)
    # the tiny tokenizer splits " yes" into "▁y" "es" and " no" into "▁n" "o": the judge compares the first pieces
    assert [tok.sp.IdToPiece(i) for i in (judge.yes_id, judge.no_id)] == ["▁y", "▁n"]
    assert ReferenceJudge(model, tok, yes=" correct", no=" wrong").yes_id == tok.encode(" correct")[0]
    with pytest.raises(ValueError, match=r"yes=' Yes' has characters the tokenizer does not cover"):
        ReferenceJudge(model, tok, yes=" Yes")
    with pytest.raises(ValueError, match=r"yes=' yes' and no=' yeah' start with the same token"):
        ReferenceJudge(model, tok, no=" yeah")
    with pytest.raises(ValueError, match="no='' encodes to no tokens"):
        ReferenceJudge(model, tok, no="")
    with pytest.raises(ValueError, match=r"exactly the fields .* got fields \['question', 'response'\]"):
        ReferenceJudge(model, tok, template="{question} {response}")
    with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
        ReferenceJudge(model, tok, max_batch=0)
    with pytest.raises(ValueError, match=r"responses\[1\] must be a str, got NoneType"):
        judge.score(["a", "b"], ["1", "2"], ["1", None])
    with pytest.raises(ValueError, match="same length, got 2, 2, 1"):
        judge.score(["a", "b"], ["1", "2"], ["1"])


def test_compiles_once_per_bucket(tok, model):
    judge = ReferenceJudge(model, tok, max_batch=2)
    first = (["1+1=", "2+2="], ["2", "4"], ["2", "5"])
    others = [(["3+44=", "15+5="], ["47", "20"], ["47", "19"]), (["3+4="] * 4, ["7"] * 4, ["1", "22", "333", "4444"])]
    lengths = {len(judge.prompt_ids(*t)) for batch in [first] + others for t in zip(*batch)}
    assert len(lengths) >= 4 and len({-(-n // 16) for n in lengths}) == 1  # other lengths, one bucket
    judge.score(*first)
    n = _yes_probability._cache_size()
    for batch in others:  # other prompts of the same padded length and row count: no new compilation
        judge.score(*batch)
    assert _yes_probability._cache_size() == n


def test_as_source(tok, model):
    judge = ReferenceJudge(model, tok)
    examples = [{"prompt": q, "answer": a} for q, a in zip(QUESTIONS, REFERENCES)]
    batch = RewardSystem([judge.as_source(normalize=False)])(examples, RESPONSES)
    np.testing.assert_allclose(batch.raw["rllm"], judge.score(QUESTIONS, REFERENCES, RESPONSES), rtol=1e-6)
    src = judge.as_source(name="judge2")
    assert src.fn(examples[2], RESPONSES[2]) == pytest.approx(float(batch.raw["rllm"][2]), rel=1e-5)
    # a non-str response fails the batch and then its own example; the others are still judged
    bad = RewardSystem([judge.as_source(normalize=False)])(examples[:3], RESPONSES[:2] + [None])
    assert bad.failures["rllm"] == {"batch raised ValueError": 1, "raised ValueError": 1}
    np.testing.assert_allclose(bad.raw["rllm"][:2], batch.raw["rllm"][:2], rtol=1e-5)
