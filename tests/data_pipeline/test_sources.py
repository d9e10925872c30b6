"""Bad input: a clear error naming file and record, or skip-and-count; never a silent change of order."""

import json

import numpy as np
import pytest
from data_helpers import take, text_config, write_jsonl

from ernie_jax.data import DataError, SourceConfig, make_pipeline

GOOD = [{"text": f"{i}+{i}={2 * i}"} for i in range(40)]
BAD = {5: b'{"text": "12+3', 11: b'{"text": "caf\xc3\x28"}', 17: {"text": ""}, 23: b'{"text": "\\ud800"}',
       29: b"not json at all", 31: {"txt": "wrong field"}}
KINDS = {5: "corrupt", 11: "utf8", 17: "empty", 23: "utf8", 29: "corrupt", 31: "corrupt"}


def _files(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD.get(i, r) for i, r in enumerate(GOOD)])
    clean = write_jsonl(tmp_path / "clean.jsonl", GOOD)
    return bad, clean


def _cfg(corpus, path, **kw):
    return text_config(corpus, sources=(SourceConfig(path=str(path)),), num_epochs=1, **kw)


def test_raise_names_file_and_record(corpus, tmp_path):
    bad, _ = _files(tmp_path)
    it = make_pipeline(_cfg(corpus, bad))
    with pytest.raises(DataError) as e:
        take(it, 100)
    assert str(bad) in str(e.value) and f"record {e.value.record}" in str(e.value)
    assert e.value.record in BAD


@pytest.mark.parametrize("rec", sorted(BAD))
def test_each_kind_is_reported(corpus, tmp_path, rec):
    bad, _ = _files(tmp_path)
    it = make_pipeline(_cfg(corpus, bad))
    g = next(g for g in range(40) if it.loader.where(g)[2] == rec)
    with pytest.raises(DataError, match=f"record {rec}: ") as e:
        it.loader.tokens(g)
    assert e.value.kind == KINDS[rec]


def test_skip_and_count_keeps_order(corpus, tmp_path):
    bad, clean = _files(tmp_path)
    skip = make_pipeline(_cfg(corpus, bad, on_bad_record="skip"))
    ref = make_pipeline(_cfg(corpus, clean))
    got_s = take(skip, 100)
    got_r = take(ref, 100)
    seq = lambda bs: [int(g) for b in bs for g in b["sample_ids"].ravel() if g >= 0]  # noqa: E731
    bad_g = {g for g in range(40) if skip.loader.where(g)[2] in BAD}
    assert seq(got_s) == [g for g in seq(got_r) if g not in bad_g]  # same order for everything else
    m = skip.metrics()
    assert m["data/skipped_records"] == len(BAD)
    assert m["data/skipped_corrupt"] == 3 and m["data/skipped_utf8"] == 2 and m["data/skipped_empty"] == 1
    assert skip.get_state()["skipped"] == {"corrupt": 3, "empty": 1, "utf8": 2}


def test_token_id_out_of_vocab(corpus, tmp_path):
    p = write_jsonl(tmp_path / "ids.jsonl", [{"ids": [5, 6, 7]}, {"ids": [5, 600, 7]}, {"ids": [-1, 2]}])
    cfg = text_config(corpus, sources=(SourceConfig(path=str(p), kind="ids"),), num_epochs=1)
    it = make_pipeline(cfg)
    for rec, tok in ((1, "600"), (2, "-1")):
        g = next(g for g in range(3) if it.loader.where(g)[2] == rec)
        with pytest.raises(DataError, match=f"record {rec}: token id {tok} .*vocab_size=512"):
            it.loader.tokens(g)


def test_truncated_binary_records(corpus, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = str(tmp_path / "ids.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    w.write(np.array([5, 6, 7], "<i4").tobytes())
    w.write(np.array([5, 6, 7], "<i4").tobytes()[:-1])
    w.close()
    it = make_pipeline(text_config(corpus, sources=(SourceConfig(path=path, format="arrayrecord", kind="ids"),),
                                   num_epochs=1))
    g = next(g for g in range(2) if it.loader.where(g)[2] == 1)
    with pytest.raises(DataError, match="record 1: 11 bytes is not a whole number"):
        it.loader.tokens(g)
    (tmp_path / "cut.array_record").write_bytes(open(path, "rb").read()[:-20])
    with pytest.raises(DataError, match="cut.array_record"):
        make_pipeline(text_config(corpus, sources=(SourceConfig(path=str(tmp_path / "cut.array_record"),
                                                                format="arrayrecord", kind="ids"),)))


def test_missing_files(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_pipeline(text_config(corpus, sources=(SourceConfig(path=str(tmp_path / "nope.jsonl")),)))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        make_pipeline(text_config(corpus, tokenizer=str(tmp_path / "nope.model")))


def test_stale_index_is_an_error(corpus, tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GOOD)
    make_pipeline(_cfg(corpus, p))
    assert (tmp_path / "a.jsonl.idx").exists()
    with open(p, "ab") as f:
        f.write(json.dumps({"text": "1+1=2"}).encode() + b"\n")
    with pytest.raises(DataError, match="stale"):
        make_pipeline(_cfg(corpus, p))


def test_truncated_last_line_without_newline(corpus, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"text": "1+1=2"}\n{"text": "2+2=4"}\n{"text": "3+')
    it = make_pipeline(_cfg(corpus, p))
    assert len(it.loader.sources[0]) == 3
    with pytest.raises(DataError, match="t.jsonl: record 2: corrupt or truncated JSON"):
        take(it, 10)
