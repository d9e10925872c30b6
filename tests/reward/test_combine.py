"""The reward system: the total is the weighted sum of each source's batch-standardised reward (so a source's
scale and offset do not matter), a constant source adds nothing, and a source that raises or returns NaN /
a non-number gives a zero reward with a counted reason instead of crashing the run. The exact-answer and
sandbox sources reward what they say."""

import math

import numpy as np
import pytest

from ernie_jax.reward import Outcome, RewardSource, RewardSystem, exact_answer_source, sandbox_source
from ernie_jax.reward.combine import EPS
from ernie_jax.synthetic import chat_tasks

N = 6
EXAMPLES = [{"i": i} for i in range(N)]
RESPONSES = [f"r{i}" for i in range(N)]
A = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
B = np.array([0.3, 0.9, 0.1, 0.4, 0.2, 0.8])


def _src(name, values, **kw):
    return RewardSource(name, lambda e, r: values[e["i"]], **kw)


def _z(x):  # the oracle: standardise by hand
    x = np.asarray(x, np.float64)
    return (x - x.sum() / len(x)) / (math.sqrt(((x - x.sum() / len(x)) ** 2).sum() / len(x)) + EPS)


def test_total_is_weighted_sum_of_standardised_rewards():
    batch = RewardSystem([_src("a", A, weight=2.0), _src("b", B, weight=0.5)])(EXAMPLES, RESPONSES)
    assert batch.total.dtype == np.float32 and batch.total.shape == (N,)
    np.testing.assert_allclose(batch.total, 2.0 * _z(A) + 0.5 * _z(B), rtol=1e-6)
    np.testing.assert_array_equal(batch.raw["a"], A)
    np.testing.assert_array_equal(batch.raw["b"], B)


def test_scale_and_offset_of_a_source_do_not_matter():
    small = RewardSystem([_src("a", A), _src("b", B)])(EXAMPLES, RESPONSES).total
    big = RewardSystem([_src("a", A), _src("b", 1000.0 * B - 7.0)])(EXAMPLES, RESPONSES).total
    np.testing.assert_allclose(big, small, rtol=1e-4, atol=1e-5)
    # without normalisation the large source dominates: the ranking follows b alone
    raw = RewardSystem([_src("a", A, normalize=False), _src("b", 1000.0 * B, normalize=False)])(EXAMPLES, RESPONSES)
    np.testing.assert_allclose(raw.total, A + 1000.0 * B, rtol=1e-6)
    assert np.argsort(raw.total).tolist() == np.argsort(B).tolist()


def test_constant_source_contributes_zero():
    batch = RewardSystem([_src("a", A), _src("const", np.full(N, 0.1))])(EXAMPLES, RESPONSES)
    np.testing.assert_array_equal(batch.normalized["const"], np.zeros(N))
    np.testing.assert_allclose(batch.total, _z(A), rtol=1e-6)
    one = RewardSystem([_src("a", A)])(EXAMPLES[:1], RESPONSES[:1])  # a batch of one ranks nothing
    assert one.total.tolist() == [0.0] and one.raw["a"].tolist() == [1.0]


def test_bad_sources_give_zero_with_counted_reasons():
    def flaky(e, r):
        i = e["i"]
        if i == 0:
            raise ZeroDivisionError("x")
        if i == 1:
            raise KeyError("y")
        return [None, None, math.nan, -math.inf, "0.5", 0.7][i]

    batch = RewardSystem([RewardSource("flaky", flaky), _src("a", A)])(EXAMPLES, RESPONSES)
    np.testing.assert_array_equal(batch.raw["flaky"], [0, 0, 0, 0, 0, 0.7])
    assert batch.failures["flaky"] == {"raised ZeroDivisionError": 1, "raised KeyError": 1, "nan": 2,
                                       "not a number": 1}
    assert not batch.failures["a"]
    assert np.isfinite(batch.total).all()
    np.testing.assert_allclose(batch.total, _z([0, 0, 0, 0, 0, 0.7]) + _z(A), rtol=1e-6)
    m = batch.metrics()
    assert m["reward/flaky_failures"] == 5.0 and m["reward/a_failures"] == 0.0
    assert m["reward/flaky_mean"] == pytest.approx(0.7 / N)
    assert m["reward/flaky_std"] == pytest.approx(np.std([0, 0, 0, 0, 0, 0.7]))
    assert m["reward/a_mean"] == pytest.approx(0.5) and m["reward/a_std"] == pytest.approx(0.5)
    assert m["reward/total_mean"] == pytest.approx(float(np.mean(batch.total)))
    # numpy scalars, bools and Outcomes are numbers; an Outcome's reasons are counted apart from failures
    ok = RewardSystem([RewardSource("np", lambda e, r: [np.float32(0.5), np.int64(2), True, Outcome(1.5, ("slow",)),
                                                        Outcome(math.nan), np.array(3.0)][e["i"]])])
    b = ok(EXAMPLES, RESPONSES)
    np.testing.assert_array_equal(b.raw["np"], [0.5, 2, 1, 1.5, 0, 3])
    assert b.failures["np"] == {"nan": 1} and b.reasons["np"] == {"slow": 1}


def test_batched_path_and_its_fallback():
    calls = {"fn": 0, "batch": 0}

    def fn(e, r):
        calls["fn"] += 1
        return B[e["i"]]

    def batch_fn(examples, responses):
        calls["batch"] += 1
        return [B[e["i"]] for e in examples]

    b = RewardSystem([RewardSource("s", fn, batch_fn=batch_fn)])(EXAMPLES, RESPONSES)
    assert calls == {"fn": 0, "batch": 1}
    np.testing.assert_array_equal(b.raw["s"], B)

    def broken_batch(examples, responses):
        raise RuntimeError("engine down")

    b = RewardSystem([RewardSource("s", fn, batch_fn=broken_batch)])(EXAMPLES, RESPONSES)
    np.testing.assert_array_equal(b.raw["s"], B)
    assert calls["fn"] == N and b.failures["s"] == {"batch raised RuntimeError": 1}
    b = RewardSystem([RewardSource("s", fn, batch_fn=lambda e, r: [1.0])])(EXAMPLES, RESPONSES)
    assert b.failures["s"] == {f"batch returned 1 rewards for {N}": 1}
    np.testing.assert_array_equal(b.raw["s"], B)


def test_validation():
    with pytest.raises(ValueError, match="at least one source"):
        RewardSystem([])
    with pytest.raises(ValueError, match="two sources named 'a'"):
        RewardSystem([_src("a", A), _src("a", B)])
    for w in (0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"reward source 'a': weight must be a finite number > 0"):
            _src("a", A, weight=w)
    with pytest.raises(ValueError, match="RewardSource.name"):
        _src("bad name", A)
    with pytest.raises(ValueError, match="6 examples and 5 responses"):
        RewardSystem([_src("a", A)])(EXAMPLES, RESPONSES[:5])
    with pytest.raises(ValueError, match="empty batch"):
        RewardSystem([_src("a", A)])([], [])


def test_exact_answer_source():
    examples = chat_tasks.heldout_prompts(4)
    responses = [examples[0]["answer"], " " + examples[1]["answer"] + "\n", examples[2]["answer"] + "0",
                 "the answer is " + examples[3]["answer"]]
    b = RewardSystem([exact_answer_source(normalize=False)])(examples, responses)
    assert b.raw["exact_answer"].tolist() == [1.0, 1.0, 0.0, 0.0]
    custom = exact_answer_source(lambda e, r: r.startswith("4"), name="starts4")
    assert RewardSystem([custom])([{}, {}], ["46", "64"]).raw["starts4"].tolist() == [1.0, 0.0]


def test_sandbox_source():
    from ernie_jax.reward.sandbox import sandbox_available
    if (why := sandbox_available()) is not None:
        pytest.skip(f"code sandbox unavailable here: {why}")
    ex = {"tests": [("3\n", "6\n"), ("5\n", "10"), ("0\n", "0")]}
    responses = [
        "Here:\n```python\nprint(int(input()) * 2)\n```\n",  # fenced: all three pass
        "n = int(input())\nprint(n * 2 if n < 4 else n)",  # bare program: 2 of 3
        "```python\nimport sys\nsys.exit(1)\n```",  # exits 1 on every test
        "```python\nwhile True:\n    pass\n```",  # times out (one test only, to keep it short)
        "   ",
    ]
    examples = [ex, ex, ex, {"tests": [("", "1")]}, ex, {"prompt": "no tests"}]
    b = RewardSystem([sandbox_source(normalize=False, timeout_s=1)])(examples, responses + ["print(1)"])
    np.testing.assert_allclose(b.raw["sandbox"], [1.0, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    assert b.reasons["sandbox"] == {"wrong_output": 1, "exit_code": 3, "timeout": 1, "no_code": 1}
    assert b.failures["sandbox"] == {"raised ValueError": 1}
