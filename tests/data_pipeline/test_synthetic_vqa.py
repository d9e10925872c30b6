"""The embedded VQA corpus: deterministic bytes, valid PNGs, disjoint splits, answers re-derived from the scene
spec and the pixels, uniform answers (so the chance levels hold), answer checking."""

import base64
import collections
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from ernie_jax.data import synthetic_vqa as vqa
from ernie_jax.data.png import encode_palette_png
from ernie_jax.data.synthetic import default_data_dir
from ernie_jax.data.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return vqa.generate(tmp_path_factory.mktemp("vqa"), train_docs=350, heldout_docs=70)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generation_is_deterministic(corpus, tmp_path):
    again = vqa.generate(tmp_path, train_docs=350, heldout_docs=70)
    assert again["train"].read_bytes() == corpus["train"].read_bytes()
    assert again["heldout"].read_bytes() == corpus["heldout"].read_bytes()


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 1), (5, 7), (56, 140), (140, 57), (2, 700)])
def test_png_encoder_round_trips(shape):
    rng = np.random.default_rng(sum(shape))
    palette = rng.integers(0, 256, (6, 3)).astype(np.uint8)
    h, w = shape
    flat = np.zeros(shape, np.int64)
    flat[h // 3:, w // 4:] = 3
    for idx in (rng.integers(0, 6, shape), flat, np.full(shape, 5)):
        img = Image.open(io.BytesIO(encode_palette_png(idx, palette)))
        assert img.mode == "P" and np.array_equal(np.asarray(img), idx)
        assert np.array_equal(np.asarray(img.convert("RGB")), palette[idx])


def test_png_encoder_rejects_bad_input():
    with pytest.raises(ValueError, match="palette indices"):
        encode_palette_png(np.full((2, 2), 7), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        encode_palette_png(np.zeros((2, 2, 2), np.int64), np.zeros((3, 3), np.uint8))


def test_splits_are_disjoint(corpus):
    train, held = _rows(corpus["train"]), _rows(corpus["heldout"])
    key = lambda e: json.dumps([e["task"], e["params"], e["scenes"]], sort_keys=True)  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in held}
    assert len({key(e) for e in held}) == len(held)
    assert not any(vqa.is_heldout(e) for e in train) and all(vqa.is_heldout(e) for e in held)
    assert {e["task"] for e in train} == set(vqa.TASKS) == {e["task"] for e in held}


def _count(shapes, **want):
    return sum(all(s[k] == v for k, v in want.items()) for s in shapes)


def _answer_from_spec(e) -> str:
    """An independent derivation of the answer from the scene spec."""
    p, scenes = e["params"], e["scenes"]
    shapes = scenes[0]["shapes"]
    if e["task"] == "count_colour":
        return f" {_count(shapes, colour=p['colour'])}"
    if e["task"] == "count_kind":
        return f" {_count(shapes, kind=p['kind'])}"
    if e["task"] == "colour":
        assert _count(shapes, kind=p["kind"]) == 1
        return " " + next(s["colour"] for s in shapes if s["kind"] == p["kind"])
    if e["task"] == "kind":
        assert _count(shapes, colour=p["colour"]) == 1
        return " " + next(s["kind"] for s in shapes if s["colour"] == p["colour"])
    if e["task"] == "relation":
        (a,), (b,) = ([s for s in shapes if [s["colour"], s["kind"]] == p[k]] for k in ("a", "b"))
        assert a["x"] + a["r"] <= b["x"] - b["r"] or b["x"] + b["r"] <= a["x"] - a["r"]  # unambiguous
        return " left" if a["x"] < b["x"] else " right"
    if e["task"] == "exists":
        return " yes" if _count(shapes, colour=p["colour"], kind=p["kind"]) else " no"
    if e["task"] == "compare":
        n1, n2 = (_count(sc["shapes"], kind=p["kind"]) for sc in scenes)
        assert n1 != n2
        return " 1" if n1 > n2 else " 2"
    if e["task"] == "describe":
        xs = [s["x"] for s in shapes]
        assert len(set(xs)) == len(xs)  # a strict order
        return " " + " and ".join(f"{s['colour']} {s['kind']}" for _, s in sorted(zip(xs, shapes), key=lambda t: t[0]))
    raise AssertionError(e["task"])


def test_answers_match_scenes_and_pixels(corpus):
    tok = SentencePieceTokenizer(str(default_data_dir() / "tokenizer.model"))
    for e in _rows(corpus["train"]) + _rows(corpus["heldout"]):
        assert e["answer"] == _answer_from_spec(e) == vqa.derive_answer(e["task"], e["params"], e["scenes"])
        images = [s for s in e["segments"] if "image" in s]
        texts = [s["text"] for s in e["segments"] if "text" in s]
        assert len(images) == len(e["scenes"]) and texts[-1] == " " + vqa.question(e["task"], e["params"])
        for t in texts + [e["answer"]]:
            assert tok.unk_id not in tok.encode(t).tolist(), t  # every word is in the tokenizer's alphabet
        for seg, scene in zip(images, e["scenes"]):
            rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(seg["image"]))).convert("RGB"))
            assert rgb.shape == (scene["h"], scene["w"], 3)
            assert vqa.MIN_SIDE <= scene["w"] <= vqa.MAX_SIDE and vqa.MIN_SIDE <= scene["h"] <= vqa.MAX_SIDE
            assert 1 <= len(scene["shapes"]) <= vqa.MAX_SHAPES
            painted = np.zeros(rgb.shape[:2], np.int64)
            for s in scene["shapes"]:
                colour = vqa.PALETTE[1 + vqa.COLOURS.index(s["colour"])]
                box = rgb[s["y"] - s["r"]:s["y"] + s["r"], s["x"] - s["r"]:s["x"] + s["r"]]
                assert box.shape[:2] == (2 * s["r"], 2 * s["r"])  # inside the picture
                assert (rgb[s["y"], s["x"]] == colour).all()  # the centre has the shape's colour
                mine = (box == colour).all(-1).mean()
                # area fraction of the box: circle pi/4, square 1, triangle 1/2
                lo, hi = {"circle": (0.7, 0.85), "square": (1.0, 1.0), "triangle": (0.45, 0.6)}[s["kind"]]
                assert lo <= mine <= hi, (s, mine)
                painted[s["y"] - s["r"]:s["y"] + s["r"], s["x"] - s["r"]:s["x"] + s["r"]] += 1
            assert painted.max() <= 1  # boxes do not overlap
            assert ((rgb == vqa.PALETTE[0]).all(-1) | (painted > 0)).all()  # background outside the boxes


def test_answers_are_uniform_so_chance_is_known():
    """Answers are drawn uniformly and independently of the picture size: the best image-blind accuracy is
    CHANCE[task]. Checked on 8000 drawn scenes (no PNG encoding, fast)."""
    rng = random.Random(0)
    answers, sizes = collections.defaultdict(collections.Counter), collections.defaultdict(list)
    for i in range(8000):
        e = vqa._example(vqa.TASKS[i % len(vqa.TASKS)], rng)
        answers[e["task"]][e["answer"]] += 1
        sizes[e["task"], e["answer"]].append(np.mean([sc["w"] * sc["h"] for sc in e["scenes"]]))
    captions = answers.pop("describe")  # 1..MAX_SHAPES shapes, each colour and kind uniform
    words = [a.split(" and ") for a in captions.elements()]
    n_shapes = collections.Counter(len(w) for w in words)
    assert sorted(n_shapes) == list(range(1, vqa.MAX_SHAPES + 1))
    assert max(n_shapes.values()) / min(n_shapes.values()) < 1.4, n_shapes
    pairs = collections.Counter(tuple(p.split()) for w in words for p in w)
    assert len(pairs) == len(vqa.COLOURS) * len(vqa.KINDS) and max(pairs.values()) / min(pairs.values()) < 1.6
    single = [w[0] for w in words if len(w) == 1]
    # the best blind guess is any one-shape caption: P(1 shape) x P(that colour and kind)
    assert abs(len(single) / len(words) - 1 / vqa.MAX_SHAPES) < 0.05
    assert vqa.CHANCE["describe"] == pytest.approx(1 / vqa.MAX_SHAPES / len(pairs))
    for task, counts in answers.items():
        assert len(counts) == round(1 / vqa.CHANCE[task]), (task, counts)
        freq = np.array(list(counts.values())) / sum(counts.values())
        assert abs(freq - vqa.CHANCE[task]).max() < 0.06, (task, counts)
    mean_area = {k: np.mean(v) for k, v in sizes.items() if k[0] != "describe"}  # captions: too many to count
    overall = np.mean([a for v in sizes.values() for a in v])
    assert all(abs(a / overall - 1) < 0.12 for a in mean_area.values()), mean_area  # size says nothing


def test_check_vqa_answer():
    ex = {"answer": " 2"}
    assert vqa.check_vqa_answer(ex, " 2") and vqa.check_vqa_answer(ex, " 2 and") and vqa.check_vqa_answer(ex, " 2.")
    assert not vqa.check_vqa_answer(ex, " 23") and not vqa.check_vqa_answer(ex, "2")
    assert not vqa.check_vqa_answer(ex, "")
    assert vqa.check_vqa_answer({"answer": " no"}, " no") and not vqa.check_vqa_answer({"answer": " no"}, " none")
    assert not vqa.check_vqa_answer({"answer": ""}, "")


def test_corpus_is_regenerated_when_its_version_stamp_differs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vqa, "generate", lambda out: calls.append(out))
    for name in ("train.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text("{}\n")
    vqa.ensure_vqa_data(tmp_path)  # no stamp: written by an older version
    (tmp_path / "version").write_text("1\n")
    vqa.ensure_vqa_data(tmp_path)
    assert calls == [tmp_path, tmp_path]
    (tmp_path / "version").write_text(f"{vqa.VERSION}\n")
    vqa.ensure_vqa_data(tmp_path)
    assert len(calls) == 2


def test_generate_writes_the_version_stamp_last(corpus):
    stamp = corpus["train"].parent / "version"
    assert stamp.read_text() == f"{vqa.VERSION}\n"
    assert stamp.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in corpus.values())
