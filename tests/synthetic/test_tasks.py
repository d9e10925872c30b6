"""Toy-task evaluation (`ernie_jax.synthetic.tasks`): picking held-out examples, prompting, turning the
engine's new tokens into completions, scoring them per task, and the printed samples, against a stand-in
engine that answers from a table (right, or wrong on chosen tasks) so no model is compiled."""

import numpy as np
import pytest

from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.presets import get_preset
from ernie_jax.synthetic import tasks, text, vqa


class FakeEngine:
    """`generate(model, prompts, ...)` answering each prompt with the token ids `answers[key(prompt)]` + eos."""

    def __init__(self, answers: dict, key):
        self.answers, self.key, self.calls = answers, key, []

    def __call__(self, model, prompts, *, max_new_tokens, eos_token_id, speculative, stats):
        self.calls.append((len(prompts), max_new_tokens, speculative))
        outs = []
        for p in prompts:
            ids = list(self.answers[self.key(p)])
            assert len(ids) <= max_new_tokens  # the budget covers the expected answer
            outs.append((ids + [eos_token_id])[:max_new_tokens])
        stats.update(generated_tokens=sum(map(len, outs)), forwards=10, accepted=5)
        return outs


@pytest.fixture(scope="module")
def text_cfg():
    return text.default_data_config("heldout")


def _continuation(tok, prompt: str, answer: str) -> list[int]:
    """The ids a model trained on `prompt + answer` (one text, as the corpus trains) continues `prompt` with."""
    full, head = tok.encode(prompt + answer).tolist(), tok.encode(prompt).tolist()
    assert full[:len(head)] == head, (prompt, answer)
    return full[len(head):]


def _text_engine(cfg, examples, wrong=()):
    tok = SentencePieceTokenizer(cfg.tokenizer)
    answers = {tuple([tok.bos_id] + tok.encode(e["prompt"]).tolist()):
               _continuation(tok, e["prompt"], " 99999 x" if e["task"] in wrong else e["answer"]) for e in examples}
    return FakeEngine(answers, tuple)


def test_pick_examples_round_robin_over_the_tasks():
    n_tasks = len([t for t in text.TASKS if t != "text"])  # plain text has no answer
    ex = tasks.pick_examples(2 * n_tasks + 1)
    assert len(ex) == 2 * n_tasks + 1 and all(e["answer"] for e in ex)
    assert len({e["task"] for e in ex[:n_tasks]}) == n_tasks == len({e["task"] for e in ex[n_tasks:2 * n_tasks]})
    assert ex == tasks.pick_examples(2 * n_tasks + 1)  # deterministic
    heldout = {e["prompt"] for e in text.load_examples("heldout")}
    assert all(e["prompt"] in heldout for e in ex)


def test_make_eval_fn_scores_per_task(text_cfg, monkeypatch):
    ex = tasks.pick_examples(20)  # 3 of some tasks, 2 of others: the overall accuracy weighs examples
    engine = _text_engine(text_cfg, ex)
    monkeypatch.setattr(tasks, "generate", engine)
    m = tasks.make_eval_fn(text_cfg, None, n_examples=20)(None, 0)
    assert m["eval/accuracy"] == 1.0 and "eval/loss" not in m and "eval/chance" not in m
    assert {k for k in m if k.startswith("eval/acc_")} == {f"eval/acc_{e['task']}" for e in ex}
    assert engine.calls and all(s is None for _, _, s in engine.calls)  # plain greedy decoding
    # answers with a leading space (" 5", " olleh") survive the completion's decode
    assert any(e["answer"].startswith(" ") for e in ex)

    monkeypatch.setattr(tasks, "generate", _text_engine(text_cfg, ex, wrong=("add", "reverse")))
    m = tasks.make_eval_fn(text_cfg, None, n_examples=20)(None, 0)
    assert m["eval/acc_add"] == m["eval/acc_reverse"] == 0.0
    assert all(v == 1.0 for k, v in m.items() if k.startswith("eval/acc_") and k not in ("eval/acc_add",
                                                                                          "eval/acc_reverse"))
    wrong = sum(e["task"] in ("add", "reverse") for e in ex)
    assert m["eval/accuracy"] == pytest.approx(1 - wrong / len(ex))


def test_print_samples(text_cfg, monkeypatch, capsys):
    ex = tasks.pick_examples(4)
    engine = _text_engine(text_cfg, ex, wrong=(ex[1]["task"],))
    monkeypatch.setattr(tasks, "generate", engine)
    stats = tasks.print_samples(None, text_cfg, 4, max_new=24, speculative="mtp")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and [ln.startswith("ok ") for ln in lines] == [True, False, True, True]
    assert f"[{ex[0]['task']}] {ex[0]['prompt']!r} -> {ex[0]['answer']!r} (expected {ex[0]['answer']!r})" in lines[0]
    assert engine.calls == [(4, 24, "mtp")]
    assert stats["acceptance_rate"] == 0.5 and stats["tokens_per_forward"] == 1.5 and stats["forwards"] == 10


@pytest.fixture()
def vqa_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_JAX_VQA_DIR", str(tmp_path))
    vqa.generate(tmp_path, train_docs=8, heldout_docs=24)
    cfg = vqa.vqa_data_config(get_preset("tiny-vl"), "heldout")
    return cfg, SentencePieceTokenizer(cfg.tokenizer)


def test_vqa_eval_fn_scores_per_question_type_beside_chance(vqa_setup, monkeypatch):
    cfg, tok = vqa_setup
    ex = tasks.pick_vqa_examples(16)
    assert [e["task"] for e in ex[:len(vqa.TASKS)]] == list(vqa.TASKS)  # round robin, corpus order
    def key(p):  # the ids alone repeat (same question, same grid): the pixels tell the pictures apart
        return tuple(p.input_ids.tolist()), b"".join(v.patches.tobytes() for v in p.images)

    # the pipeline tokenizes a record's answer on its own (`DocumentEncoder.document`)
    answers = {key(vqa.encode_example_prompt(e, cfg)): tok.encode(e["answer"]).tolist() for e in ex}
    monkeypatch.setattr(tasks, "generate", FakeEngine(answers, key))
    m = tasks.make_vqa_eval_fn(cfg, None, n_examples=16)(None, 0)
    assert m["eval/accuracy"] == 1.0
    assert {k for k in m if k.startswith("eval/acc_")} == {f"eval/acc_{t}" for t in vqa.TASKS}
    assert m["eval/chance"] == pytest.approx(np.mean([vqa.CHANCE[e["task"]] for e in ex]))
    blind = {k: tok.encode(" yes").tolist() for k in answers}  # one answer for every question
    monkeypatch.setattr(tasks, "generate", FakeEngine(blind, key))
    m = tasks.make_vqa_eval_fn(cfg, None, n_examples=16)(None, 0)
    assert m["eval/acc_exists"] == np.mean([e["answer"] == " yes" for e in ex if e["task"] == "exists"])
    assert m["eval/acc_describe"] == 0.0
