"""make_multimodal_pipeline: layout, budgets, placeholders and pixels against the processor, loss masks,
restart, process-count change (exactly once), Grain workers, bad records, state checks."""

import base64
import io
import json

import numpy as np
import pytest
from data_helpers import concat_rows, same_bytes, take, write_jsonl
from PIL import Image

from ernie_jax.data.config import SourceConfig
from ernie_jax.data.multimodal import MM_KEYS, MultimodalDataConfig, make_multimodal_pipeline
from ernie_jax.data.sources import DataError
from ernie_jax.processor import SpecialTokens, preprocess_image, type_ids
from ernie_jax.synthetic import vqa
from ernie_jax.synthetic.text import default_data_dir
from ernie_jax.synthetic.vqa import encode_example_prompt

SPECIAL = SpecialTokens(image_token_id=512, image_start_token_id=513, image_end_token_id=514, video_token_id=515,
                        video_start_token_id=516, video_end_token_id=517)  # tiny-vl's


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return vqa.generate(tmp_path_factory.mktemp("vqa"), train_docs=240, heldout_docs=20)


def mm_config(path, **kw) -> MultimodalDataConfig:
    base = dict(sources=(SourceConfig(path=str(path)),), tokenizer=str(default_data_dir() / "tokenizer.model"),
                seq_len=160, global_batch_size=4, max_docs_per_row=6, max_patches_per_row=320, max_images_per_row=5,
                seed=3, docs_per_read=8, special=SPECIAL)
    base.update(kw)
    return MultimodalDataConfig(**base)


def _record(loader, g) -> dict:
    """The raw JSON record of global sample g, read directly from its file."""
    src, _, r = loader.where(g)
    with open(src, "rb") as f:
        return json.loads(f.read().splitlines()[r])


def test_batch_layout(corpus):
    b = next(make_multimodal_pipeline(mm_config(corpus["train"]), process_index=1, process_count=2))
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        **{k: ((2, 160), "int32") for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask",
                                            "mm_token_type_ids", "moe_mm_token_type_ids")},
        "sample_ids": ((2, 6), "int64"), "pixel_values": ((2, 320, 588), "float32"),
        "image_grid_thw": ((2, 5, 3), "int32")}
    assert set(b) == set(MM_KEYS)


def test_rows_respect_budgets_and_match_the_processor(corpus):
    cfg = mm_config(corpus["train"])
    it = make_multimodal_pipeline(cfg)
    special = SPECIAL
    n_docs = 0
    for b in take(it, 4):
        for r in range(cfg.global_batch_size):
            seg, grids = b["segment_ids"][r], b["image_grid_thw"][r]
            used = grids[:, 0] > 0
            k = int(used.sum())
            assert used[:k].all() and not grids[k:].any()  # grid rows packed from 0, the rest zero
            patches = int(grids[:k].prod(-1).sum())
            assert patches <= cfg.max_patches_per_row and k <= cfg.max_images_per_row
            assert (b["pixel_values"][r, :patches] != 0).any(-1).all() and not b["pixel_values"][r, patches:].any()
            assert (b["tokens"][r] == special.image_token_id).sum() == int((grids[:k, 1] * grids[:k, 2] // 4).sum())
            mm, moe = type_ids(b["tokens"][r], special)
            assert (b["mm_token_type_ids"][r] == np.where(seg > 0, mm, 0)).all()
            assert (b["moe_mm_token_type_ids"][r] == np.where(seg > 0, moe, 0)).all()
            _, tmoe = type_ids(b["targets"][r], special)
            assert (b["loss_mask"][r] == ((seg > 0) & (tmoe == 0))).all()  # no loss on image-span targets
            ids = b["sample_ids"][r][b["sample_ids"][r] >= 0]
            assert len(ids) == seg.max() <= cfg.max_docs_per_row
            # every document's tokens and pixels, from the raw record through the processor
            po = io_ = 0
            for j, g in enumerate(ids):
                rec = _record(it.loader, int(g))
                pos = np.flatnonzero(seg == j + 1)
                assert (b["positions"][r, pos] == np.arange(len(pos))).all()
                enc = encode_example_prompt(rec, cfg, it.loader.encoder)
                tok = it.loader.encoder.tokenizer
                want = np.concatenate([enc.input_ids, tok.encode(rec["answer"]), [tok.eos_id]])
                assert (b["tokens"][r, pos] == want[:-1]).all() and (b["targets"][r, pos] == want[1:]).all()
                for s in (s for s in rec["segments"] if "image" in s):
                    px, grid = preprocess_image(Image.open(io.BytesIO(base64.b64decode(s["image"]))))
                    assert (b["image_grid_thw"][r, io_] == grid).all()
                    assert np.array_equal(b["pixel_values"][r, po:po + len(px)], px)
                    po, io_ = po + len(px), io_ + 1
                n_docs += 1
            assert po == patches and io_ == k
    assert n_docs > 20


def test_answer_only_loss(corpus):
    cfg = mm_config(corpus["train"], answer_only_loss=True)
    it = make_multimodal_pipeline(cfg)
    b = next(it)
    tok = it.loader.encoder.tokenizer
    for r in range(cfg.global_batch_size):
        for j, g in enumerate(b["sample_ids"][r][b["sample_ids"][r] >= 0]):
            rec = _record(it.loader, int(g))
            pos = np.flatnonzero(b["segment_ids"][r] == j + 1)
            want = np.concatenate([tok.encode(rec["answer"]), [tok.eos_id]])
            m = b["loss_mask"][r, pos].astype(bool)
            assert m.sum() == len(want) and m[-len(want):].all()  # exactly the answer and eos, at the end
            assert (b["targets"][r, pos][m] == want).all()


def test_determinism_and_resume(corpus):
    cfg = mm_config(corpus["train"])
    ref = take(make_multimodal_pipeline(cfg), 8)
    assert len(ref) == 8 and same_bytes(ref, take(make_multimodal_pipeline(cfg), 8))
    assert not same_bytes(ref[:2], take(make_multimodal_pipeline(cfg.replace(seed=4)), 2))
    for k in (0, 3):
        it = make_multimodal_pipeline(cfg)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        assert k == 0 or state["carry"]  # documents are carried over: the restore re-reads them
        it2 = make_multimodal_pipeline(cfg)
        it2.set_state(state)
        assert same_bytes(take(it2, 8 - k), ref[k:])


def test_process_count_change_exactly_once(corpus):
    """4 processes consume k batches and save; 2 restore and finish the epoch: the global stream equals a
    1-process run bitwise, and every record appears exactly once."""
    cfg = mm_config(corpus["train"], num_epochs=1)
    four = [make_multimodal_pipeline(cfg, process_index=p, process_count=4) for p in range(4)]
    got = [concat_rows([next(it) for it in four]) for _ in range(5)]
    states = [it.get_state() for it in four]
    assert all(s == states[0] for s in states)
    two = [make_multimodal_pipeline(cfg, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        it.set_state(json.loads(json.dumps(states[0])))
    while parts := take(two[0], 1) + take(two[1], 1):
        assert len(parts) == 2
        got.append(concat_rows(parts))
    ref = make_multimodal_pipeline(cfg)
    assert same_bytes(got, take(ref, 10_000))
    ids = np.concatenate([b["sample_ids"].ravel() for b in got])
    ids = ids[ids >= 0]
    assert sorted(ids.tolist()) == list(range(240))
    assert sorted(ref.loader.where(int(g))[2] for g in ids) == list(range(240))


def test_grain_workers_give_the_same_bytes(corpus):
    cfg = mm_config(corpus["train"])
    ref = take(make_multimodal_pipeline(cfg), 10)
    it = make_multimodal_pipeline(cfg.replace(worker_count=2, docs_per_read=4))
    try:
        got = take(it, 6)
        state = it.get_state()
        got += take(it, 4)
    finally:
        it.close()
    assert same_bytes(got, ref)
    it2 = make_multimodal_pipeline(cfg.replace(read_threads=2))
    it2.set_state(state)
    assert same_bytes(take(it2, 4), ref[6:])


def _png(w, h) -> str:
    return base64.b64encode(vqa.png_bytes({"w": w, "h": h, "shapes": []})).decode()


@pytest.mark.parametrize("bad, match, kind", [
    (b"{broken", "corrupt or truncated JSON", "corrupt"),
    ({"text": "no segments"}, "a list 'segments'", "corrupt"),
    ({"segments": [{"video": "x"}]}, "segment 0: unknown segment type 'video'", "corrupt"),
    ({"segments": [{"text": "a"}, {"image": "%%%"}]}, "segment 1: image is not valid base64", "image"),
    ({"segments": [{"image": base64.b64encode(b"not an image").decode()}]}, "segment 0: cannot decode", "image"),
    ({"segments": [{"image": _png(56, 56)}] * 6}, "needs .* 6 images; .* max_images_per_row=5", "too_long"),
    ({"segments": [{"image": _png(280, 280)}]}, "needs .* 400 patches", "too_long"),
    ({"segments": [{"text": "a b c d e f g h i j k l m n o p q " * 12}]}, "positions", "too_long"),
])
def test_bad_record_names_file_and_record(corpus, tmp_path, bad, match, kind):
    good = [json.loads(x) for x in corpus["heldout"].read_text().splitlines()]
    p = write_jsonl(tmp_path / "mm.jsonl", good[:7] + [bad] + good[7:])
    cfg = mm_config(p, num_epochs=1)
    with pytest.raises(DataError, match=f"mm.jsonl: record 7: .*{match}"):
        take(make_multimodal_pipeline(cfg), 100)
    it = make_multimodal_pipeline(cfg.replace(on_bad_record="skip"))
    batches = take(it, 100)
    ids = np.concatenate([b["sample_ids"].ravel() for b in batches])
    assert len(ids[ids >= 0]) == len(good) and it.metrics()[f"data/skipped_{kind}"] == 1


def test_bad_record_in_a_worker_names_file_and_record(corpus, tmp_path):
    good = [json.loads(x) for x in corpus["heldout"].read_text().splitlines()]
    p = write_jsonl(tmp_path / "w.jsonl", good[:12] + [b"{broken"])
    it = make_multimodal_pipeline(mm_config(p, num_epochs=1, worker_count=2, docs_per_read=4))
    try:
        with pytest.raises(DataError, match="w.jsonl: record 12: corrupt or truncated JSON"):
            take(it, 100)
    finally:
        it.close()


def test_state_checks(corpus):
    cfg = mm_config(corpus["train"])
    it = make_multimodal_pipeline(cfg)
    next(it)
    with pytest.raises(ValueError, match="another data config"):
        make_multimodal_pipeline(cfg.replace(max_patches_per_row=400)).set_state(it.get_state())
    make_multimodal_pipeline(cfg.replace(read_threads=2)).set_state(it.get_state())  # loader knobs are fine
    text_state = {**it.get_state(), "kind": None}
    with pytest.raises(ValueError, match="not a multimodal data pipeline state"):
        make_multimodal_pipeline(cfg).set_state(text_state)
