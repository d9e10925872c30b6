"""The embedded multimodal corpus: rendered shapes with checkable questions (visual question answering).

A scene is a plain white picture of 84..140 px per side (any aspect ratio in that range; the image processor
snaps it to multiples of 28) holding 1..2 non-overlapping flat-colour shapes (circle / square / triangle in
red, green, blue, yellow, purple) of 20 px or more across, i.e. at least 3/4 of a 28-px LM token (version 1
drew 1..4 shapes from 14 px in 56..140 px pictures: a tiny model from scratch did not get past the answer
priors within a CPU run; these scenes it learns, see experiments/configs/tiny_vl.py). Question types
(`TASKS`), with answers drawn *uniformly and independently of the question text and the picture sizes* before
the scene is built to match, so an image-blind model can do no better than `CHANCE[task]`:

    count_colour  picture 1 <img> how many red shapes =                       0..2        1/3
    count_kind    picture 1 <img> how many circles =                          0..2        1/3
    colour        picture 1 <img> colour of the circle =                      5 colours   1/5
    kind          picture 1 <img> shape of the red one =                      3 shapes    1/3
    relation      picture 1 <img> is the red square left or right of the ... left/right  1/2
    exists        picture 1 <img> is there a green triangle =                 yes/no      1/2
    compare       picture 1 <img> picture 2 <img> which picture has more circles =  1/2   1/2
    describe      picture 1 <img> the shapes from left to right =   red circle and blue square   1/30

`describe` is a caption with a checkable answer (every shape, left to right; 1..2 shapes, each colour and
kind uniform): it carries a learning signal in every answer token, where a question carries one token's
worth, which is what lets a tiny model from scratch ground its answers in the pixels within a CPU run (real
recipes align vision on captions too). Its chance is that of the best blind guess (one shape, any kind).

(the tokenizer of the text corpus has no "?" or ":" and no capital P, hence the wording.)

**Record format** (one JSON object per JSONL line, or per ArrayRecord record); the multimodal pipeline reads
only `segments` and `answer`, so real data can use the same format:

    {"segments": [{"text": "picture 1"}, {"image": "<base64 of PNG/JPEG/... bytes>"},
                  {"text": " how many red shapes ="}],
     "answer": " 2",                                    # optional; appended as text (answer-only loss)
     "task": "count_colour", "params": {"colour": "red"}, "scenes": [{"w":, "h":, "shapes": [...]}]}

`task`, `params` and `scenes` are metadata: the scene spec (integer centres `x, y` and half-size `r` of each
shape) re-derives the answer (`derive_answer`) and re-renders the picture (`render`).

Deterministic: `generate(out_dir)` writes `train.jsonl` and `heldout.jsonl` with the same records and the
same decoded pixels on every machine (Python's `random.Random`, integer rasterisation); the PNG bytes are
Pillow's (palette PNG), so they can differ between zlib builds, the pictures cannot. An example is held out
iff a hash of its (task, params, scenes) falls in a fixed 1/10 bucket, so the splits are disjoint by
construction. `vqa_data_config(model_config, split)` is the corpus as a `MultimodalDataConfig`;
`encode_example_prompt` is a record's prompt as the model sees it at evaluation.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ernie_jax.data.config import SourceConfig
from ernie_jax.data.multimodal import MultimodalDataConfig
from ernie_jax.data.multimodal.document import DocumentEncoder
from ernie_jax.processor import EncodedPrompt
from ernie_jax.synthetic.text import default_data_dir, draw_split, jsonl_bytes, write_atomic

COLOURS = ("red", "green", "blue", "yellow", "purple")
KINDS = ("circle", "square", "triangle")
TASKS = ("count_colour", "count_kind", "colour", "kind", "relation", "exists", "compare", "describe")
PALETTE = np.array([(255, 255, 255), (220, 40, 40), (40, 170, 60), (40, 90, 220), (235, 200, 30), (150, 60, 180)],
                   np.uint8)  # background, then COLOURS
MIN_SIDE, MAX_SIDE = 84, 140
MAX_SHAPES, MAX_COUNT = 2, 2
MIN_R, R_DIV = 10, 4  # shape half-size in px: MIN_R .. max(MIN_R + 1, min(w, h) // R_DIV)
CHANCE = {"count_colour": 1 / (MAX_COUNT + 1), "count_kind": 1 / (MAX_COUNT + 1), "colour": 1 / len(COLOURS),
          "kind": 1 / len(KINDS), "relation": 1 / 2, "exists": 1 / 2, "compare": 1 / 2,
          "describe": 1 / (MAX_SHAPES * len(COLOURS) * len(KINDS))}
VERSION = 3  # of the corpus bytes; bump on any change to what `generate` writes (2: `describe`, bigger shapes;
#             3: PNGs written by Pillow)
TRAIN_DOCS = 20_000
HELDOUT_DOCS = 1_000
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_GAP = 2  # px between shape boxes


# -- scenes ---------------------------------------------------------------------------------------------
def render(scene: dict) -> np.ndarray:
    """Palette indices [h, w] uint8 of a scene (index 0 background, 1 + COLOURS.index(colour) per shape).

    Integer arithmetic on doubled pixel-centre coordinates, so every machine draws the same pixels. Shape
    (x, y, r) covers columns [x - r, x + r) and rows [y - r, y + r)."""
    h, w = scene["h"], scene["w"]
    out = np.zeros((h, w), np.uint8)
    py = 2 * np.arange(h)[:, None] + 1
    px = 2 * np.arange(w)[None, :] + 1
    for s in scene["shapes"]:
        dx, dy, r2 = px - 2 * s["x"], py - 2 * s["y"], 2 * s["r"]
        if s["kind"] == "circle":
            m = dx * dx + dy * dy <= r2 * r2
        elif s["kind"] == "square":
            m = (np.abs(dx) <= r2) & (np.abs(dy) <= r2)
        elif s["kind"] == "triangle":  # apex up, base on the box's bottom edge
            down = dy + r2  # 0 at the apex row's top edge, 2 * r2 at the base
            m = (down >= 0) & (down <= 2 * r2) & (2 * np.abs(dx) <= down)
        else:
            raise ValueError(f"unknown shape kind {s['kind']!r}")
        out[m] = 1 + COLOURS.index(s["colour"])
    return out


def png_bytes(scene: dict) -> bytes:
    """The scene as a palette PNG (Pillow): decodes to `PALETTE[render(scene)]`."""
    im = Image.fromarray(render(scene))  # mode "L"; the palette makes it "P"
    im.putpalette(PALETTE.tobytes(), rawmode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _place(rng: random.Random, descs: list[tuple[str, str]], w: int, h: int,
           ok=lambda shapes: True) -> list[dict]:
    """Shapes with the given (colour, kind) at random non-overlapping positions; `ok` may reject a layout."""
    rmax = max(MIN_R + 1, min(w, h) // R_DIV)
    while True:
        shapes: list[dict] = []
        for colour, kind in descs:
            for _ in range(100):
                r = rng.randint(MIN_R, rmax)
                x, y = rng.randint(r, w - r), rng.randint(r, h - r)
                if all(abs(x - o["x"]) >= r + o["r"] + _GAP or abs(y - o["y"]) >= r + o["r"] + _GAP for o in shapes):
                    shapes.append({"colour": colour, "kind": kind, "r": r, "x": x, "y": y})
                    break
            else:
                break
        if len(shapes) == len(descs) and ok(shapes):
            return shapes


def _scene(rng: random.Random, descs: list[tuple[str, str]], ok=lambda shapes: True) -> dict:
    # the size is drawn before (and independently of) the content: the token count says nothing about the answer
    w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    descs = list(descs)
    rng.shuffle(descs)
    return {"w": w, "h": h, "shapes": _place(rng, descs, w, h, ok)}


def _others(rng: random.Random, n: int, allowed) -> list[tuple[str, str]]:
    """n random (colour, kind) pairs for which allowed(colour, kind) holds."""
    pool = [(c, k) for c in COLOURS for k in KINDS if allowed(c, k)]
    return [rng.choice(pool) for _ in range(n)]


# -- questions ------------------------------------------------------------------------------------------
def _example(task: str, rng: random.Random) -> dict:
    """One example of `task`: the answer is drawn first, then a scene that has it."""
    if task in ("count_colour", "count_kind"):
        n = rng.randint(0, MAX_COUNT)
        extra = rng.randint(1 if n == 0 else 0, MAX_SHAPES - n)
        if task == "count_colour":
            c = rng.choice(COLOURS)
            params = {"colour": c}
            descs = [(c, rng.choice(KINDS)) for _ in range(n)] + _others(rng, extra, lambda c2, k2: c2 != c)
        else:
            k = rng.choice(KINDS)
            params = {"kind": k}
            descs = [(rng.choice(COLOURS), k) for _ in range(n)] + _others(rng, extra, lambda c2, k2: k2 != k)
        return {"task": task, "params": params, "scenes": [_scene(rng, descs)], "answer": f" {n}"}
    if task == "colour":
        c, k = rng.choice(COLOURS), rng.choice(KINDS)
        descs = [(c, k)] + _others(rng, rng.randint(0, MAX_SHAPES - 1), lambda c2, k2: k2 != k)
        return {"task": task, "params": {"kind": k}, "scenes": [_scene(rng, descs)], "answer": f" {c}"}
    if task == "kind":
        c, k = rng.choice(COLOURS), rng.choice(KINDS)
        descs = [(c, k)] + _others(rng, rng.randint(0, MAX_SHAPES - 1), lambda c2, k2: c2 != c)
        return {"task": task, "params": {"colour": c}, "scenes": [_scene(rng, descs)], "answer": f" {k}"}
    if task == "relation":
        a, b = rng.sample([(c, k) for c in COLOURS for k in KINDS], 2)
        side = rng.choice(("left", "right"))
        extra = _others(rng, rng.randint(0, MAX_SHAPES - 2), lambda c2, k2: (c2, k2) not in (a, b))
        # a and b are placed first (the shuffle moves them); the layout must separate them horizontally
        scene = _scene(rng, [a, b] + extra, ok=lambda sh: _apart(_find(sh, a), _find(sh, b), side))
        return {"task": task, "params": {"a": list(a), "b": list(b)}, "scenes": [scene], "answer": f" {side}"}
    if task == "exists":
        c, k = rng.choice(COLOURS), rng.choice(KINDS)
        yes = rng.random() < 0.5
        extra = _others(rng, rng.randint(0 if yes else 1, MAX_SHAPES - 1), lambda c2, k2: (c2, k2) != (c, k))
        descs = ([(c, k)] if yes else []) + extra
        return {"task": task, "params": {"colour": c, "kind": k}, "scenes": [_scene(rng, descs)],
                "answer": " yes" if yes else " no"}
    if task == "compare":
        k = rng.choice(KINDS)
        more = rng.randint(1, 2)
        hi, lo = rng.choice([(i, j) for i in range(MAX_COUNT + 1) for j in range(i)])
        scenes = []
        for n in ((hi, lo) if more == 1 else (lo, hi)):
            extra = _others(rng, rng.randint(1 if n == 0 else 0, MAX_SHAPES - n), lambda c2, k2: k2 != k)
            scenes.append(_scene(rng, [(rng.choice(COLOURS), k) for _ in range(n)] + extra))
        return {"task": task, "params": {"kind": k}, "scenes": scenes, "answer": f" {more}"}
    if task == "describe":
        descs = [(rng.choice(COLOURS), rng.choice(KINDS)) for _ in range(rng.randint(1, MAX_SHAPES))]
        scene = _scene(rng, descs, ok=lambda sh: len({s["x"] for s in sh}) == len(sh))  # a strict left-to-right order
        return {"task": task, "params": {}, "scenes": [scene], "answer": _caption(scene["shapes"])}
    raise ValueError(f"unknown task {task!r}")


def _caption(shapes: list[dict]) -> str:
    return " " + " and ".join(f"{s['colour']} {s['kind']}" for s in sorted(shapes, key=lambda s: s["x"]))


def _find(shapes: list[dict], desc) -> dict:
    return next(s for s in shapes if (s["colour"], s["kind"]) == tuple(desc))


def _apart(a: dict, b: dict, side: str) -> bool:
    """a lies entirely `side` of b (their column ranges do not overlap)."""
    return a["x"] + a["r"] <= b["x"] - b["r"] if side == "left" else b["x"] + b["r"] <= a["x"] - a["r"]


def question(task: str, params: dict) -> str:
    if task == "count_colour":
        return f"how many {params['colour']} shapes ="
    if task == "count_kind":
        return f"how many {_PLURAL[params['kind']]} ="
    if task == "colour":
        return f"colour of the {params['kind']} ="
    if task == "kind":
        return f"shape of the {params['colour']} one ="
    if task == "relation":
        (ca, ka), (cb, kb) = params["a"], params["b"]
        return f"is the {ca} {ka} left or right of the {cb} {kb} ="
    if task == "exists":
        return f"is there a {params['colour']} {params['kind']} ="
    if task == "compare":
        return f"which picture has more {_PLURAL[params['kind']]} ="
    if task == "describe":
        return "the shapes from left to right ="
    raise ValueError(f"unknown task {task!r}")


def derive_answer(task: str, params: dict, scenes: list[dict]) -> str:
    """The answer, computed from the scene spec alone."""
    shapes = scenes[0]["shapes"]
    if task == "count_colour":
        return f" {sum(s['colour'] == params['colour'] for s in shapes)}"
    if task == "count_kind":
        return f" {sum(s['kind'] == params['kind'] for s in shapes)}"
    if task == "colour":
        (s,) = [s for s in shapes if s["kind"] == params["kind"]]
        return f" {s['colour']}"
    if task == "kind":
        (s,) = [s for s in shapes if s["colour"] == params["colour"]]
        return f" {s['kind']}"
    if task == "relation":
        (a,) = [s for s in shapes if [s["colour"], s["kind"]] == list(params["a"])]
        (b,) = [s for s in shapes if [s["colour"], s["kind"]] == list(params["b"])]
        if _apart(a, b, "left"):
            return " left"
        if _apart(a, b, "right"):
            return " right"
        raise ValueError("relation: the two shapes overlap horizontally")
    if task == "exists":
        return " yes" if any((s["colour"], s["kind"]) == (params["colour"], params["kind"]) for s in shapes) else " no"
    if task == "compare":
        n1, n2 = (sum(s["kind"] == params["kind"] for s in sc["shapes"]) for sc in scenes)
        if n1 == n2:
            raise ValueError("compare: both pictures have the same count")
        return " 1" if n1 > n2 else " 2"
    if task == "describe":
        if len({s["x"] for s in shapes}) != len(shapes):
            raise ValueError("describe: two shapes share a centre column")
        return _caption(shapes)
    raise ValueError(f"unknown task {task!r}")


def segments(example: dict) -> list[dict]:
    """The prompt as record segments: text and base64 PNG images."""
    segs: list[dict] = []
    for i, scene in enumerate(example["scenes"]):
        segs.append({"text": f"picture {i + 1}" if i == 0 else f" picture {i + 1}"})
        segs.append({"image": base64.b64encode(png_bytes(scene)).decode("ascii")})
    segs.append({"text": " " + question(example["task"], example["params"])})
    return segs


def _identity(example: dict) -> str:
    return json.dumps([example["task"], example["params"], example["scenes"]], sort_keys=True)


def is_heldout(example: dict) -> bool:
    return hashlib.blake2b(_identity(example).encode(), digest_size=4).digest()[0] % 10 == 0


def examples(split: str, n: int, seed: int) -> list[dict]:
    """`n` records of `split` ("train" | "heldout"), tasks round-robin; held-out examples are unique."""
    return [{**ex, "segments": segments(ex)}
            for ex in draw_split(split, n, seed, TASKS, _example, is_heldout, _identity)]


def check_vqa_answer(example: dict, completion: str) -> bool:
    """True when `completion` (the model's continuation of the prompt) starts with the expected answer and the
    answer is not continued by more letters or digits (" 1" does not pass for " 12", " no" not for " none")."""
    ans = example["answer"]
    if not ans or not completion.startswith(ans):
        return False
    return not completion[len(ans):len(ans) + 1].isalnum()


# -- files ----------------------------------------------------------------------------------------------
def generate(out_dir: str | os.PathLike, *, train_docs: int = TRAIN_DOCS, heldout_docs: int = HELDOUT_DOCS
             ) -> dict[str, Path]:
    """Writes train.jsonl and heldout.jsonl (deterministic bytes), then the `version` stamp."""
    out = Path(out_dir)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    (out / "version").unlink(missing_ok=True)  # a crash below leaves no stamp: regenerated on next use
    write_atomic(paths["train"], jsonl_bytes(examples("train", train_docs, seed=4321)))
    write_atomic(paths["heldout"], jsonl_bytes(examples("heldout", heldout_docs, seed=8765)))
    for p in paths.values():
        Path(str(p) + ".idx").unlink(missing_ok=True)  # rebuilt on first use
    write_atomic(out / "version", f"{VERSION}\n".encode())
    return paths


def vqa_data_dir() -> Path:
    """`$ERNIE_JAX_VQA_DIR` or `<repo>/data/vqa`."""
    env = os.environ.get("ERNIE_JAX_VQA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "vqa"


def ensure_vqa_data(out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Generates the corpus on first use (or when its `version` stamp is not `VERSION`); returns its paths."""
    out = Path(out_dir) if out_dir is not None else vqa_data_dir()
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    stamp = out / "version"
    if not (all(p.exists() for p in paths.values()) and stamp.exists() and stamp.read_text().strip() == str(VERSION)):
        generate(out)  # missing, or written by another version of this module
    return paths


def load_examples(split: str = "heldout") -> list[dict]:
    """The records of one split of the corpus (generated on first use)."""
    with open(ensure_vqa_data()[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- as data --------------------------------------------------------------------------------------------
def vqa_data_config(model_config: Any, split: str = "train", **overrides) -> MultimodalDataConfig:
    """The `MultimodalDataConfig` of split `split` ("train" | "heldout") of the corpus (generated on first use
    into data/vqa/) with the embedded 512-piece tokenizer, the special ids and patch / merge sizes of
    `model_config` (e.g. tiny-vl); `overrides` replace its fields."""
    paths = ensure_vqa_data()
    kw: dict[str, Any] = dict(sources=(SourceConfig(path=str(paths[split]), name=f"vqa-{split}"),),
                              tokenizer=str(default_data_dir() / "tokenizer.model"), seq_len=256,
                              global_batch_size=16, max_docs_per_row=16, max_patches_per_row=512,
                              max_images_per_row=16, docs_per_read=16)
    kw.update(overrides)
    return MultimodalDataConfig.from_model_config(model_config, **kw)


def encode_example_prompt(example: dict, data_config: MultimodalDataConfig,
                          encoder: DocumentEncoder | None = None) -> EncodedPrompt:
    """A record's prompt (bos + segments, no answer, no eos) as the processor's `EncodedPrompt`: what a model is
    prompted with to answer it (int64 ids and type ids, images as `Vision`). Pass `encoder` to reuse one."""
    enc = encoder or DocumentEncoder(data_config)
    segments, _ = enc.parse_object({"segments": example["segments"]}, "<example>", 0)
    return enc.prompt(segments, "<example>", 0)
