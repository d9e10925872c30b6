"""SFT batches: conversations packed whole, the loss mask on exactly the assistant tokens (checked by decoding
the masked targets back to the answers), bad records named, and an exact resume."""

import json

import numpy as np
import pytest

from ernie_jax.data import DataConfig, DataError, SentencePieceTokenizer
from ernie_jax.posttrain.chat_pipeline import make_chat_pipeline
from ernie_jax.synthetic import chat_tasks
from ernie_jax.synthetic.text import ensure_default_data

EXAMPLES = chat_tasks.sft_examples("train", 40, seed=11)


@pytest.fixture(scope="module")
def tok_path():
    return str(ensure_default_data()["tokenizer"])


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": e["messages"]}) + "\n" for e in EXAMPLES))
    return path


def _cfg(path, tok, **kw):
    d = dict(sources=[{"path": str(path), "kind": "chat"}], tokenizer=tok, seq_len=64, global_batch_size=4,
             max_docs_per_row=16, num_epochs=1)
    d.update(kw)
    return DataConfig.from_dict(d)


def test_rows_hold_whole_conversations_with_the_loss_on_the_answers(chat_file, tok_path):
    tok = SentencePieceTokenizer(tok_path)
    it = make_chat_pipeline(_cfg(chat_file, tok_path))
    seen = []
    for b in it:
        for r in range(b["tokens"].shape[0]):
            for j, g in enumerate(b["sample_ids"][r]):
                if g < 0:
                    continue
                rec = EXAMPLES[it.loader.order(int(g))[2]]
                seg = b["segment_ids"][r] == j + 1
                tokens, targets, mask = b["tokens"][r][seg], b["targets"][r][seg], b["loss_mask"][r][seg] == 1
                assert tokens[0] == tok.bos_id and targets[-1] == tok.eos_id  # never cut
                np.testing.assert_array_equal(b["positions"][r][seg], np.arange(seg.sum()))
                assert targets[mask][-1] == tok.eos_id and mask[-1]
                assert tok.decode(targets[mask][:-1].tolist()) == rec["answer"]  # exactly the answer's tokens
                assert not mask[:np.flatnonzero(mask)[0]].any() and mask[np.flatnonzero(mask)[0]:].all()
                seen.append(rec["prompt"])
        assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
    assert sorted(seen) == sorted(e["prompt"] for e in EXAMPLES)  # each conversation once


def test_resume_gives_the_same_batches(chat_file, tok_path):
    cfg = _cfg(chat_file, tok_path, num_epochs=None, global_batch_size=2, seq_len=48)
    it = make_chat_pipeline(cfg)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = make_chat_pipeline(cfg)
    again.set_state(json.loads(json.dumps(state)))
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_bad_conversations_are_named_or_skipped(tmp_path, tok_path):
    path = tmp_path / "bad.jsonl"
    rows = [EXAMPLES[0]["messages"],
            [{"role": "user", "content": "1+1="}, {"role": "user", "content": "again"}],  # roles do not alternate
            [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "  "}],  # empty answer
            [{"role": "user", "content": "count " * 80}, {"role": "assistant", "content": "1"}]]  # too long
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    for record, pattern in ((1, "alternate"), (2, "empty assistant"), (3, "does not fit seq_len")):
        one = tmp_path / f"one{record}.jsonl"
        one.write_text(json.dumps({"messages": rows[record]}) + "\n")
        with pytest.raises(DataError, match=rf"one{record}.jsonl: record 0: .*{pattern}"):
            next(make_chat_pipeline(_cfg(one, tok_path)))
    it = make_chat_pipeline(_cfg(path, tok_path, on_bad_record="skip"))
    b = next(it)
    assert it.get_state()["skipped"] == {"chat": 2, "too_long": 1}
    assert (b["sample_ids"] >= 0).sum() == 1


def test_text_sources_are_refused(tok_path):
    from ernie_jax.synthetic.text import default_data_config
    with pytest.raises(ValueError, match="kind='chat' sources only"):
        make_chat_pipeline(default_data_config("train"))
