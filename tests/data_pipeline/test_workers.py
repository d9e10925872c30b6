"""Grain multiprocessing workers (mp_prefetch) give the same bytes as worker count 0, and resume exactly."""

import json

from data_helpers import same_bytes, take, text_config

from ernie_jax.data import make_pipeline


def test_two_workers_equal_zero_workers_and_resume(corpus):
    ref = take(make_pipeline(text_config(corpus)), 100)
    it = make_pipeline(text_config(corpus, worker_count=2, docs_per_read=16))
    try:
        got = take(it, 60)
        state = json.loads(json.dumps(it.get_state()))
        got += take(it, 40)
    finally:
        it.close()
    assert same_bytes(got, ref)
    it2 = make_pipeline(text_config(corpus, worker_count=2, docs_per_read=16, read_threads=2))
    try:
        it2.set_state(state)
        assert same_bytes(take(it2, 10), ref[60:70])
    finally:
        it2.close()


def test_bad_record_in_a_worker_names_file_and_record(corpus, tmp_path):
    import pytest
    from data_helpers import write_jsonl

    from ernie_jax.data import DataError, SourceConfig
    p = write_jsonl(tmp_path / "w.jsonl", [{"text": f"{i}+1"} for i in range(50)] + [b"{broken"])
    it = make_pipeline(text_config(corpus, sources=(SourceConfig(path=str(p)),), num_epochs=1, worker_count=2,
                                   docs_per_read=8))
    try:
        with pytest.raises(DataError, match="w.jsonl: record 50: corrupt or truncated JSON"):
            take(it, 100)
    finally:
        it.close()
