"""The embedded VQA corpus: deterministic records, PNGs that decode to the rendered scenes, disjoint splits,
answers re-derived from the scene spec and the pixels, uniform answers (so the chance levels hold), answer
checking, its data config and prompts."""

import base64
import collections
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from ernie_jax.data import MultimodalDataConfig
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.presets import get_preset
from ernie_jax.processor import SpecialTokens
from ernie_jax.synthetic import vqa
from ernie_jax.synthetic.text import default_data_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return vqa.generate(tmp_path_factory.mktemp("vqa"), train_docs=350, heldout_docs=70)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generation_is_deterministic(corpus, tmp_path):
    """The records (scenes, questions, answers) are the same; the pictures are checked as pixels below (PNG
    bytes are the encoder's business)."""
    again = vqa.generate(tmp_path, train_docs=350, heldout_docs=70)
    for split in ("train", "heldout"):
        meta = lambda rows: [{k: v for k, v in e.items() if k != "segments"} for e in rows]  # noqa: E731
        texts = lambda rows: [[s.get("text") for s in e["segments"]] for e in rows]  # noqa: E731
        a, b = _rows(again[split]), _rows(corpus[split])
        assert meta(a) == meta(b) and texts(a) == texts(b)


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_corpus_images_decode_to_the_rendered_scenes(corpus):
    """What is deterministic is the pixels: every image of the corpus decodes to its scene re-rendered."""
    n = 0
    for e in _rows(corpus["train"])[:60] + _rows(corpus["heldout"]):
        images = [s["image"] for s in e["segments"] if "image" in s]
        for data, scene in zip(images, e["scenes"], strict=True):
            assert np.array_equal(_decoded(base64.b64decode(data)), vqa.PALETTE[vqa.render(scene)])
            n += 1
    assert n > 130


@pytest.mark.parametrize("w, h", [(1, 1), (3, 1), (1, 5), (84, 140), (140, 84)])
def test_png_bytes_decode_to_the_palette_colours(w, h):
    """Odd sizes and every colour: the PNG decodes to exactly PALETTE[render(scene)]; independent of the
    renderer, the scene's background is white and each shape's centre pixel has its colour."""
    rng = random.Random(w * 1000 + h)
    shapes = [] if min(w, h) < 40 else [
        {"colour": c, "kind": rng.choice(vqa.KINDS), "r": 10, "x": 12 + 24 * i, "y": h // 2}
        for i, c in enumerate(vqa.COLOURS[:min(w, h) // 24])]
    scene = {"w": w, "h": h, "shapes": shapes}
    rgb = _decoded(vqa.png_bytes(scene))
    assert rgb.shape == (h, w, 3) and np.array_equal(rgb, vqa.PALETTE[vqa.render(scene)])
    assert (rgb[0, 0] == (255, 255, 255)).all()
    for s in shapes:
        assert (rgb[s["y"], s["x"]] == vqa.PALETTE[1 + vqa.COLOURS.index(s["colour"])]).all()


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


def test_vqa_data_config_takes_the_model_s_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_JAX_VQA_DIR", str(tmp_path))
    vqa.generate(tmp_path, train_docs=16, heldout_docs=8)  # stamped: used as it is
    model = get_preset("tiny-vl")
    cfg = vqa.vqa_data_config(model, "heldout", seq_len=128, max_patches_per_row=256)
    assert isinstance(cfg, MultimodalDataConfig) and (cfg.seq_len, cfg.max_patches_per_row) == (128, 256)
    assert cfg.special == SpecialTokens.from_config(model) and cfg.special.image_token_id == model.image_token_id
    assert cfg.patch_size == model.vision.patch_size and cfg.spatial_merge_size == model.vision.spatial_merge_size
    assert cfg.sources[0].path == str(tmp_path / "heldout.jsonl") and len(_rows(tmp_path / "heldout.jsonl")) == 8
    assert cfg.tokenizer == str(default_data_dir() / "tokenizer.model")


def test_encode_example_prompt(corpus):
    """bos + the question's segments: text tokenized, each image as start + placeholders + end; no answer."""
    model = get_preset("tiny-vl")
    cfg = MultimodalDataConfig.from_model_config(model, sources=(str(corpus["heldout"]),),
                                                 tokenizer=str(default_data_dir() / "tokenizer.model"))
    tok = SentencePieceTokenizer(cfg.tokenizer)
    e = next(e for e in _rows(corpus["heldout"]) if e["task"] == "compare")  # two pictures
    enc = vqa.encode_example_prompt(e, cfg)
    ids = enc.input_ids.tolist()
    assert ids[0] == tok.bos_id and len(enc.images) == 2
    sp = cfg.special
    want = [tok.bos_id]
    for seg, v in zip(e["segments"], [None, enc.images[0], None, enc.images[1], None], strict=True):
        if "text" in seg:
            want += tok.encode(seg["text"]).tolist()
        else:
            h, w = (np.asarray(v.grid_thw)[1:] // cfg.spatial_merge_size).tolist()
            want += [sp.image_start_token_id] + [sp.image_token_id] * (h * w) + [sp.image_end_token_id]
    assert ids == want
