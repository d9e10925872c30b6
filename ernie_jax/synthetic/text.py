"""The embedded text corpus: arithmetic / algorithmic tasks with checkable answers plus templated text.

Deterministic: `generate(out_dir)` writes `train.jsonl` and `heldout.jsonl` with the same bytes on every
machine (Python's `random.Random` with fixed seeds; no hash randomisation, no set iteration). Held-out
examples are disjoint from training ones: an example belongs to the held-out split iff a hash of its
(task, prompt) falls in a fixed 1/10 bucket, so no held-out prompt ever appears in `train.jsonl`.

Held-out lines are `{"text", "task", "prompt", "answer"}` with `text == prompt + answer` (`answer` is "" for
plain templated text); training lines are `{"text", "task"}`. `check_answer(example, completion)` scores a
model's greedy completion. The sentencepiece model (`tokenizer.model`, vocab 512 = the `tiny` preset's) is
trained on `train.jsonl` deterministically and kept in `data/default/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from ernie_jax.data.config import DataConfig, SourceConfig
from ernie_jax.data.tokenizer import train_sentencepiece

TASKS = ("add", "sub", "mul", "reverse", "sort", "count", "succ", "story", "text")
TRAIN_DOCS = 100_000
HELDOUT_DOCS = 2_000
VOCAB_SIZE = 512
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia")
_THINGS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "cups")
_ADJ = ("red", "small", "quiet", "old", "bright", "lazy", "happy", "tall", "green", "cold")
_NOUN = ("cat", "dog", "bird", "fox", "child", "robot", "farmer", "teacher", "horse", "sailor")
_VERB = ("sees", "follows", "helps", "finds", "likes", "watches", "calls", "meets")
_PLACE = ("in the park", "near the river", "at home", "on the hill", "by the sea", "in the town")


def _example(task: str, rng: random.Random) -> tuple[str, str]:
    r = rng.randint
    if task == "add":
        a, b = r(0, 999), r(0, 999)
        return f"{a}+{b}=", f"{a + b}"
    if task == "sub":
        a = r(0, 999)
        b = r(0, a)
        return f"{a}-{b}=", f"{a - b}"
    if task == "mul":
        a, b = r(0, 999), r(0, 9)
        return f"{a}*{b}=", f"{a * b}"
    if task == "reverse":
        w = "".join(rng.choice(_LETTERS) for _ in range(r(3, 8)))
        return f"reverse {w} =", f" {w[::-1]}"
    if task == "sort":
        d = "".join(str(r(0, 9)) for _ in range(r(3, 8)))
        return f"sort {d} =", f" {''.join(sorted(d))}"
    if task == "count":
        c = rng.choice("abc")
        s = "".join(rng.choice("abcd") for _ in range(r(3, 10)))
        return f"count {c} in {s} =", f" {s.count(c)}"
    if task == "succ":
        n = r(0, 9998)
        return f"after {n} comes", f" {n + 1}"
    if task == "story":
        who, what = rng.choice(_NAMES), rng.choice(_THINGS)
        n, m = r(1, 20), r(1, 20)
        return (f"{who} has {n} {what}. {who} gets {m} more. Now {who} has", f" {n + m} {what}.")
    if task == "text":
        sents = []
        for _ in range(r(1, 3)):
            sents.append(f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the "
                         f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}.")
        return " ".join(sents), ""
    raise ValueError(f"unknown task {task!r}")


def is_heldout(task: str, prompt: str) -> bool:
    return hashlib.blake2b(f"{task}\x00{prompt}".encode(), digest_size=4).digest()[0] % 10 == 0


T = TypeVar("T")


def draw_split(split: str, n: int, seed: int, tasks: Sequence[str], draw: Callable[[str, random.Random], T],
               heldout: Callable[[T], bool], key: Callable[[T], Hashable]) -> list[T]:
    """`n` examples of `split` ("train" | "heldout"), `draw(task, rng)` with tasks round-robin, kept when
    `heldout(example)` matches the split; held-out examples are unique by `key`."""
    rng = random.Random(seed)
    want_heldout = split == "heldout"
    out, seen = [], set()
    for _ in range(100 * n + 10_000):
        if len(out) == n:
            break
        ex = draw(tasks[len(out) % len(tasks)], rng)
        if heldout(ex) != want_heldout:
            continue
        if want_heldout:
            k = key(ex)
            if k in seen:
                continue
            seen.add(k)
        out.append(ex)
    else:
        raise RuntimeError(f"could not draw {n} distinct {split} examples")
    return out


def examples(split: str, n: int, seed: int) -> list[dict]:
    """`n` examples of `split` ("train" | "heldout"), tasks in equal proportion; held-out prompts are unique."""
    drawn = draw_split(split, n, seed, TASKS, lambda task, rng: (task, *_example(task, rng)),
                       lambda e: is_heldout(e[0], e[1]), lambda e: e[:2])
    return [{"text": prompt + answer, "task": task, "prompt": prompt, "answer": answer}
            for task, prompt, answer in drawn]


def check_answer(example: dict, completion: str) -> bool:
    """True when `completion` (the model's continuation of `prompt`) starts with the expected answer and the
    answer is not followed by more digits (so "12" does not pass for "1")."""
    ans = example["answer"]
    if not ans or not completion.startswith(ans):
        return False
    rest = completion[len(ans):]
    return not (ans[-1].isdigit() and rest[:1].isdigit())


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def jsonl_bytes(rows: list[dict]) -> bytes:
    """One JSON object per line, keys sorted (the same bytes for the same rows)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def generate(out_dir: str | os.PathLike, *, train_docs: int = TRAIN_DOCS, heldout_docs: int = HELDOUT_DOCS,
             tokenizer: bool = True, retrain_tokenizer: bool = False) -> dict[str, Path]:
    """Writes train.jsonl, heldout.jsonl (and tokenizer.model if missing or `retrain_tokenizer`)."""
    out = Path(out_dir)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "tokenizer": out / "tokenizer.model"}
    write_atomic(paths["train"], jsonl_bytes([{"text": e["text"], "task": e["task"]}
                                              for e in examples("train", train_docs, seed=1234)]))
    write_atomic(paths["heldout"], jsonl_bytes(examples("heldout", heldout_docs, seed=5678)))
    for p in (out / "train.jsonl.idx", out / "heldout.jsonl.idx"):
        p.unlink(missing_ok=True)  # rebuilt on first use
    if tokenizer and (retrain_tokenizer or not paths["tokenizer"].exists()):
        write_atomic(paths["tokenizer"], train_tokenizer_bytes(paths["train"]))
    return paths


def train_tokenizer_bytes(train_jsonl: Path, vocab_size: int = VOCAB_SIZE) -> bytes:
    """The sentencepiece model trained on the `text` of `train_jsonl` (the same bytes on every run)."""
    with tempfile.TemporaryDirectory() as tmp, open(train_jsonl, encoding="utf-8") as f:
        (Path(tmp) / "corpus.txt").write_text("".join(json.loads(line)["text"] + "\n" for line in f),
                                              encoding="utf-8")
        cwd = os.getcwd()
        os.chdir(tmp)  # the model records its input / prefix paths: keep them fixed for identical bytes
        try:
            model = train_sentencepiece("corpus.txt", "spm", vocab_size)
        finally:
            os.chdir(cwd)
        return (Path(tmp) / model).read_bytes()


def default_data_dir() -> Path:
    """`$ERNIE_JAX_DATA_DIR` or `<repo>/data/default`."""
    env = os.environ.get("ERNIE_JAX_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "default"


def ensure_default_data(out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Generates the default corpus on first use (a few seconds); returns its paths."""
    out = Path(out_dir) if out_dir is not None else default_data_dir()
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "tokenizer": out / "tokenizer.model"}
    if not (paths["train"].exists() and paths["heldout"].exists() and paths["tokenizer"].exists()):
        generate(out)
    return paths


def default_data_config(split: str = "train", **overrides) -> DataConfig:
    """The `DataConfig` of split `split` ("train" | "heldout") of the embedded corpus (generated on first use);
    `overrides` replace its fields."""
    paths = ensure_default_data()
    kw = dict(sources=(SourceConfig(path=str(paths[split]), name=f"default-{split}"),),
              tokenizer=str(paths["tokenizer"]), seq_len=256, global_batch_size=16, max_docs_per_row=64)
    kw.update(overrides)
    return DataConfig(**kw)


def load_examples(split: str = "heldout") -> list[dict]:
    """The records of one split of the embedded corpus (generated on first use)."""
    with open(ensure_default_data()[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f]
