"""The embedded tasks as chat data: SFT and held-out sets disjoint, the strict answer check, preference pairs
whose chosen answers are right and rejected ones wrong, deterministically."""

import random
import re

import pytest

from ernie_jax.data import SentencePieceTokenizer
from ernie_jax.posttrain import chat
from ernie_jax.synthetic import chat_tasks
from ernie_jax.synthetic import text as synthetic


def test_conversation():
    ex = {"task": "add", "prompt": "12+34=", "answer": "46"}
    assert chat_tasks.conversation(ex) == [{"role": "user", "content": "12+34="},
                                           {"role": "assistant", "content": "46"}]
    story = next(e for e in synthetic.examples("train", 20, seed=0) if e["task"] == "story")
    assert story["answer"].startswith(" ") and story["answer"].endswith(".")
    assert chat_tasks.conversation(story)[1]["content"] == story["answer"][1:]
    with pytest.raises(ValueError, match="task 'text' has no answer"):
        chat_tasks.conversation({"task": "text", "prompt": "The cat sees the dog.", "answer": ""})


def test_sft_and_heldout_sets_are_disjoint():
    sft = chat_tasks.sft_examples("train", 3000, seed=0)
    held = chat_tasks.heldout_prompts(600)
    assert len(sft) == 3000 and len(held) == 600
    assert {e["task"] for e in sft} == {e["task"] for e in held} == set(chat_tasks.TASKS)
    assert set(chat_tasks.TASKS) == set(synthetic.TASKS) - {"text"}
    assert not any(synthetic.is_heldout(e["task"], e["prompt"]) for e in sft)
    assert all(synthetic.is_heldout(e["task"], e["prompt"]) for e in held)
    assert not {(e["task"], e["prompt"]) for e in sft} & {(e["task"], e["prompt"]) for e in held}
    assert len({(e["task"], e["prompt"]) for e in held}) == len(held)
    for i, e in enumerate(sft[:200]):
        chat.validate(e["messages"], index=i)
        assert e["messages"][1]["content"] == e["answer"] and chat_tasks.check_response(e, e["answer"])
    for i, e in enumerate(held):
        chat.validate(e["messages"], add_generation_prompt=True, index=i)
        assert e["messages"] == [{"role": "user", "content": e["prompt"]}]
    assert chat_tasks.sft_examples("train", 50, seed=0) == sft[:50]  # deterministic, prefix-stable


def test_heldout_prompts_are_the_corpus_heldout_prompts():
    corpus = [e for e in synthetic.load_examples("heldout") if e["answer"]][:100]
    assert [(e["task"], e["prompt"], e["answer"].strip()) for e in chat_tasks.heldout_prompts(100)] == \
        [(e["task"], e["prompt"], e["answer"].strip()) for e in corpus]


def test_sft_examples_render():
    tok = SentencePieceTokenizer(str(synthetic.ensure_default_data()["tokenizer"]))
    for e in chat_tasks.sft_examples("train", 16, seed=1):
        r = chat.render(e["messages"], tok)
        assert r.ids[r.loss_mask == 1].tolist() == [*tok.encode(e["answer"]), tok.eos_id]


def test_check_response():
    add, story = {"answer": "46"}, {"answer": " 7 apples."}
    assert chat_tasks.check_response(add, "46") and chat_tasks.check_response(add, "46 ")
    assert chat_tasks.check_response(add, " 46\n")
    for wrong in ("460", "4", "46.", "46 apples", "the answer is 46", "", " ", "４６"):
        assert not chat_tasks.check_response(add, wrong), wrong
    assert chat_tasks.check_response(story, "7 apples.") and chat_tasks.check_response(story, " 7 apples. ")
    for wrong in ("7", "7 apples", "7 pens.", "8 apples.", "7  apples."):
        assert not chat_tasks.check_response(story, wrong), wrong
    assert not chat_tasks.check_response({"answer": ""}, "") and not chat_tasks.check_response(add, None)


def _same_form(task, right, wrong):
    if task in ("reverse", "sort"):
        return len(wrong) == len(right) and wrong.isalpha() == right.isalpha()
    num = r"(0|[1-9][0-9]*)"
    if task == "story":
        return re.fullmatch(num + " " + re.escape(right.split(" ", 1)[1]), wrong) is not None
    return re.fullmatch(num, wrong) is not None


def test_preference_pairs():
    pairs = chat_tasks.preference_pairs("train", 900, seed=3)
    assert {p["task"] for p in pairs} == set(chat_tasks.TASKS)
    for i, p in enumerate(pairs):
        chat.check_pair(p, index=i)
        right, wrong = p["chosen"][-1]["content"], p["rejected"][-1]["content"]
        assert chat_tasks.check_response(p, right) and not chat_tasks.check_response(p, wrong), p
        assert right == p["answer"] and wrong != right and _same_form(p["task"], right, wrong), p
        if p["task"] in ("reverse", "sort") and len(set(right)) > 1:
            assert sorted(wrong) == sorted(right)  # a permutation, not the right one
        assert not synthetic.is_heldout(p["task"], p["prompt"])
    assert chat_tasks.preference_pairs("train", 900, seed=3) == pairs
    assert chat_tasks.preference_pairs("train", 900, seed=4) != pairs
    held = chat_tasks.preference_pairs("heldout", 50, seed=3)
    assert all(synthetic.is_heldout(p["task"], p["prompt"]) for p in held)


@pytest.mark.parametrize("task, right", [("reverse", "aaa"), ("sort", "555"), ("reverse", "ab"), ("count", "0"),
                                          ("sub", "9"), ("succ", "10"), ("mul", "8991"), ("story", "2 cups.")])
def test_wrong_answer_edge_cases(task, right):
    for seed in range(40):
        wrong = chat_tasks.wrong_answer(task, right, random.Random(seed))
        assert wrong != right and not chat_tasks.check_response({"answer": right}, wrong), (seed, wrong)
        assert _same_form(task, right, wrong), (seed, wrong)
