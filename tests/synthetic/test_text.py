"""The embedded text corpus: deterministic, held-out disjoint from train, answers checkable, its data config."""

import json

from ernie_jax.data import DataConfig, SentencePieceTokenizer
from ernie_jax.synthetic import text as synthetic


def test_deterministic_and_disjoint(tmp_path, corpus):
    p = synthetic.generate(tmp_path, train_docs=1500, heldout_docs=200, tokenizer=False)
    assert p["train"].read_bytes() == corpus["train"].read_bytes()
    assert p["heldout"].read_bytes() == corpus["heldout"].read_bytes()
    train = [json.loads(x) for x in corpus["train"].read_text().splitlines()]
    held = [json.loads(x) for x in corpus["heldout"].read_text().splitlines()]
    assert {e["task"] for e in train} == set(synthetic.TASKS) == {e["task"] for e in held}
    train_texts = {e["text"] for e in train}
    assert not any(e["answer"] and e["text"] in train_texts for e in held)
    assert all(e["text"] == e["prompt"] + e["answer"] for e in held)


def test_tokenizer_training_is_deterministic(corpus):
    assert synthetic.train_tokenizer_bytes(corpus["train"]) == corpus["tokenizer"].read_bytes()


def test_check_answer():
    ex = {"prompt": "2+3=", "answer": "5"}
    assert synthetic.check_answer(ex, "5") and synthetic.check_answer(ex, "5 and more")
    assert not synthetic.check_answer(ex, "56") and not synthetic.check_answer(ex, " 5")
    assert not synthetic.check_answer({"prompt": "text", "answer": ""}, "")


def test_default_data_config():
    cfg = synthetic.default_data_config("heldout", seq_len=32)
    assert isinstance(cfg, DataConfig) and cfg.seq_len == 32 and cfg.global_batch_size == 16
    assert cfg.sources[0].path.endswith("heldout.jsonl")
    assert SentencePieceTokenizer(cfg.tokenizer).vocab_size == synthetic.VOCAB_SIZE == 512
