"""make_pipeline: determinism, resume, resize (exactly once), mixing, sources, state checks, Orbax round trip,
the data config required."""

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import concat_rows, same_bytes, take, text_config, write_jsonl

from ernie_jax.data import SentencePieceTokenizer, SourceConfig, make_pipeline
from ernie_jax.data.packing import chunks_of


def test_batch_layout(corpus):
    it = make_pipeline(text_config(corpus), process_index=1, process_count=2)
    b = next(it)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((4, 32), "int32"), "targets": ((4, 32), "int32"), "segment_ids": ((4, 32), "int32"),
        "positions": ((4, 32), "int32"), "loss_mask": ((4, 32), "int32"), "sample_ids": ((4, 8), "int64")}
    assert b["loss_mask"].mean() > 0.8  # packed, not padded


def test_determinism_100_batches(corpus):
    a = take(make_pipeline(text_config(corpus)), 100)
    b = take(make_pipeline(text_config(corpus)), 100)
    assert len(a) == 100 and same_bytes(a, b)
    c = take(make_pipeline(text_config(corpus, seed=4)), 5)
    assert not same_bytes(a[:5], c)


@pytest.mark.parametrize("k", [0, 1, 7])
def test_resume_bit_exact(corpus, k):
    ref = take(make_pipeline(text_config(corpus)), k + 5)
    it = make_pipeline(text_config(corpus))
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    it2 = make_pipeline(text_config(corpus))
    it2.set_state(state)
    assert same_bytes(take(it2, 5), ref[k:])


def test_resize_4_to_2_exactly_once(corpus):
    """4 processes consume k batches and save; 2 processes restore and finish the epoch. The global stream
    equals an uninterrupted 1-process run bitwise, and every record is consumed exactly once."""
    cfg = text_config(corpus, num_epochs=1)
    k = 9
    four = [make_pipeline(cfg, process_index=p, process_count=4) for p in range(4)]
    got = [concat_rows([next(it) for it in four]) for _ in range(k)]
    states = [it.get_state() for it in four]
    assert all(s == states[0] for s in states)  # the state is global
    two = [make_pipeline(cfg, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        it.set_state(json.loads(json.dumps(states[0])))
    while True:
        parts = take(two[0], 1) + take(two[1], 1)
        if not parts:
            break
        assert len(parts) == 2
        got.append(concat_rows(parts))
    ref = take(make_pipeline(cfg), 10_000)
    assert same_bytes(got, ref)
    # exactly once: every record of the epoch appears, each document's chunks each once
    loader = make_pipeline(cfg).loader
    ids = np.concatenate([b["sample_ids"].ravel() for b in got])
    ids = ids[ids >= 0]
    g, counts = np.unique(ids, return_counts=True)
    n_records = len(loader.sources[0])
    assert g.tolist() == list(range(n_records))
    expected = [len(chunks_of(int(x), loader.tokens(int(x)), cfg.seq_len)) for x in g]
    assert counts.tolist() == expected
    assert sorted(loader.where(int(x))[2] for x in g) == list(range(n_records))
    tokens = sum(int(b["loss_mask"].sum()) for b in got)
    assert tokens == sum(len(loader.tokens(int(x))) - 1 for x in g)


def test_process_count_must_divide_batch(corpus):
    with pytest.raises(ValueError, match="not divisible"):
        make_pipeline(text_config(corpus), process_index=0, process_count=3)


def test_state_from_other_config_rejected(corpus):
    it = make_pipeline(text_config(corpus))
    next(it)
    with pytest.raises(ValueError, match="another data config"):
        make_pipeline(text_config(corpus, seq_len=64)).set_state(it.get_state())
    make_pipeline(text_config(corpus, worker_count=0, read_threads=2)).set_state(it.get_state())  # loader knobs ok


def test_mixing_weights_honoured(corpus, tmp_path):
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i} b"} for i in range(400)])
    cfg = text_config(corpus, sources=(SourceConfig(path=str(corpus["train"]), weight=0.75),
                                       SourceConfig(path=str(other), weight=0.25)), mix_block=64)
    it = make_pipeline(cfg)
    ids = np.concatenate([b["sample_ids"].ravel() for b in take(it, 40)])
    ids = np.unique(ids[ids >= 0])
    frac = np.mean([it.loader.where(int(g))[0] == str(other) for g in ids])
    assert len(ids) > 500 and abs(frac - 0.25) < 0.03, (len(ids), frac)


def test_pretokenized_and_arrayrecord_sources_agree(corpus, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    tok = SentencePieceTokenizer(str(corpus["tokenizer"]))
    texts = [json.loads(x)["text"] for x in corpus["train"].read_text().splitlines()]
    ids_jsonl = write_jsonl(tmp_path / "ids.jsonl", [{"ids": tok.encode(t).tolist()} for t in texts])
    w_text = ArrayRecordWriter(str(tmp_path / "text.array_record"), "group_size:1")
    w_ids = ArrayRecordWriter(str(tmp_path / "ids.array_record"), "group_size:1")
    for t in texts:
        w_text.write(t.encode())
        w_ids.write(tok.encode(t).astype("<i4").tobytes())
    w_text.close()
    w_ids.close()
    ref = take(make_pipeline(text_config(corpus)), 6)
    variants = [SourceConfig(path=str(ids_jsonl), kind="ids"),
                SourceConfig(path=str(tmp_path / "text.array_record"), format="arrayrecord"),
                SourceConfig(path=str(tmp_path / "ids.array_record"), format="arrayrecord", kind="ids")]
    for src in variants:
        assert same_bytes(take(make_pipeline(text_config(corpus, sources=(src,))), 6), ref), src


def test_orbax_checkpoint_with_grain_handler(corpus, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    ref = take(make_pipeline(text_config(corpus)), 6)
    it = make_pipeline(text_config(corpus))
    take(it, 3)
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=opts)
    mngr.save(3, args=ocp.args.Composite(step=ocp.args.StandardSave({"x": np.arange(3)}),
                                         data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    fresh = make_pipeline(text_config(corpus))
    mngr.restore(3, args=ocp.args.Composite(step=ocp.args.StandardRestore({"x": np.zeros(3, np.int64)}),
                                            data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    mngr.close()
    assert same_bytes(take(fresh, 3), ref[3:])


def test_the_data_config_is_required():
    with pytest.raises(ValueError, match="needs a data config .*default_data_config"):
        make_pipeline(None)
    with pytest.raises(ValueError, match="must be a DataConfig or a dict, got str"):
        make_pipeline("data.jsonl")


def test_state_restores_against_a_moved_copy_of_the_data(corpus, tmp_path):
    import shutil
    ref = take(make_pipeline(text_config(corpus)), 5)
    it = make_pipeline(text_config(corpus))
    take(it, 2)
    moved = {k: Path(shutil.copy(corpus[k], tmp_path / corpus[k].name)) for k in ("train", "tokenizer")}
    it2 = make_pipeline(text_config(moved))
    it2.set_state(it.get_state())
    assert same_bytes(take(it2, 3), ref[2:])
