"""The embedded text tasks as chat data: SFT conversations, held-out prompts, the exact answer check (the
verifier of RL) and preference pairs (right vs wrong answer) for DPO.

An example of `text.examples` becomes one user turn, its prompt ("12+34="), and one assistant turn, its answer
without the corpus's leading space ("46"; the story task's "7 apples."). Plain text (task "text") has no answer
and is left out. The SFT set comes from the train split and the held-out prompts from the held-out split:
`text.is_heldout` (a hash of task and prompt) puts each prompt in exactly one split, so the sets never share a
prompt. The held-out prompts are those of the corpus's heldout.jsonl, in its order.
"""

from __future__ import annotations

import random

from ernie_jax.posttrain.chat import check_pair
from ernie_jax.synthetic import text

TASKS = tuple(t for t in text.TASKS if t != "text")
HELDOUT_SEED = 5678  # the seed of `text.generate`'s heldout.jsonl
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def conversation(example: dict) -> list[dict]:
    """[user: the prompt, assistant: the answer without surrounding spaces] of a task example."""
    if not example.get("answer", "").strip():
        raise ValueError(f"example of task {example.get('task')!r} has no answer to converse about: {example!r}")
    return [{"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["answer"].strip()}]


def _drawn(split: str, n: int, seed: int) -> list[dict]:
    """The first n examples with answers of `text.examples(split, ., seed)` (which cycles through all tasks)."""
    m = -(-n * len(text.TASKS) // len(TASKS))
    return [e for e in text.examples(split, m, seed) if e["answer"]][:n]


def _record(e: dict, messages: list[dict]) -> dict:
    return {"task": e["task"], "prompt": e["prompt"], "answer": e["answer"].strip(), "messages": messages}


def sft_examples(split: str, n: int, seed: int) -> list[dict]:
    """n conversations of `split` ("train" for SFT; "heldout" for a held-out loss): records {task, prompt,
    answer, messages}, `messages` the user / assistant conversation, tasks in equal proportion."""
    return [_record(e, conversation(e)) for e in _drawn(split, n, seed)]


def heldout_prompts(n: int, seed: int = HELDOUT_SEED) -> list[dict]:
    """n held-out prompts (unique): records {task, prompt, answer, messages}, `messages` the user turn alone,
    for generation (`chat.prompt`) and scoring (`check_response`)."""
    return [_record(e, conversation(e)[:1]) for e in _drawn("heldout", n, seed)]


def check_response(example: dict, response: str) -> bool:
    """True iff the whole assistant response is the example's answer, up to surrounding whitespace: "46" and
    "46 " pass for 46, "460", "46." and "the answer is 46" do not; the story task's "7 apples." needs the words."""
    answer = example.get("answer", "").strip()
    return bool(answer) and isinstance(response, str) and response.strip() == answer


def _changed_char(s: str, alphabet: str, rng: random.Random, *, no_leading_zero: bool = False) -> str:
    i = rng.randrange(len(s))
    choices = [c for c in alphabet if c != s[i] and not (no_leading_zero and i == 0 and len(s) > 1 and c == "0")]
    return s[:i] + rng.choice(choices) + s[i + 1:]


def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """An answer of the same form as `answer` (stripped) that is not it: for reverse / sort two different
    characters swapped (one character changed when all are equal); for numbers (and the story task's number)
    one more, one less or one digit changed, never with a leading zero."""
    if task in ("reverse", "sort"):
        swaps = [(i, j) for i in range(len(answer)) for j in range(i + 1, len(answer)) if answer[i] != answer[j]]
        if not swaps:
            return _changed_char(answer, "0123456789" if task == "sort" else _LETTERS, rng)
        i, j = rng.choice(swaps)
        chars = list(answer)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    number, space, words = answer.partition(" ")
    k = int(number)
    kind = rng.choice(("up", "down", "digit") if k > 0 else ("up", "digit"))
    wrong = (str(k + 1) if kind == "up" else str(k - 1) if kind == "down"
             else _changed_char(number, "0123456789", rng, no_leading_zero=True))
    return wrong + space + words


def preference_pairs(split: str, n: int, seed: int) -> list[dict]:
    """n preference pairs of `split`: records {task, prompt, answer, chosen, rejected}, `chosen` the conversation
    with the right answer and `rejected` the same prompt with `wrong_answer` (drawn from `seed`: the same seed
    gives the same pairs). Each pair passes `chat.check_pair`."""
    rng = random.Random(f"preference-pairs:{seed}")
    out = []
    for i, e in enumerate(_drawn(split, n, seed)):
        chosen = conversation(e)
        rejected = chosen[:1] + [{"role": "assistant", "content": wrong_answer(e["task"], chosen[1]["content"], rng)}]
        pair = {"task": e["task"], "prompt": e["prompt"], "answer": chosen[1]["content"], "chosen": chosen,
                "rejected": rejected}
        check_pair(pair, index=i)
        out.append(pair)
    return out


# -- the sets as files for the post-training pipelines (generated on first use beside the text corpus) -------
SIZES = {"chat_train": 20_000, "chat_heldout": 1_000, "preference_train": 10_000}
_SEEDS = {"chat_train": 4321, "chat_heldout": 8765, "preference_train": 2468}


def ensure_chat_data(out_dir=None) -> dict[str, "text.Path"]:
    """Writes chat_train.jsonl ({"task", "messages"}; the SFT set), chat_heldout.jsonl (held-out conversations,
    for a held-out loss) and preference_train.jsonl ({"task", "chosen", "rejected"}) into the embedded corpus'
    directory when missing (deterministic bytes, atomic writes); returns their paths."""
    out = text.Path(out_dir) if out_dir is not None else text.default_data_dir()
    text.ensure_default_data(out)
    paths = {name: out / f"{name}.jsonl" for name in SIZES}
    for name, path in paths.items():
        if path.exists():
            continue
        split = "heldout" if name.endswith("heldout") else "train"
        if name.startswith("chat"):
            rows = [{"task": e["task"], "messages": e["messages"]}
                    for e in sft_examples(split, SIZES[name], _SEEDS[name])]
        else:
            rows = [{"task": p["task"], "chosen": p["chosen"], "rejected": p["rejected"]}
                    for p in preference_pairs(split, SIZES[name], _SEEDS[name])]
        text.write_atomic(path, text.jsonl_bytes(rows))
    return paths


def _data_config(name: str, kind: str, **overrides):
    from ernie_jax.data.config import DataConfig, SourceConfig  # noqa: PLC0415
    paths = ensure_chat_data()
    kw = dict(sources=(SourceConfig(path=str(paths[name]), kind=kind, name=name),),
              tokenizer=str(text.ensure_default_data()["tokenizer"]), seq_len=128, global_batch_size=16,
              max_docs_per_row=32)
    kw.update(overrides)
    return DataConfig(**kw)


def chat_data_config(split: str = "train", **overrides):
    """The `DataConfig` of the SFT conversations (`split="train"`) or the held-out ones, for
    `posttrain.chat_pipeline`; `overrides` replace its fields."""
    return _data_config(f"chat_{split}", "chat", **overrides)


def preference_data_config(split: str = "train", **overrides):
    """The `DataConfig` of the preference pairs (train split only), for `posttrain.preference_pipeline`."""
    if split != "train":
        raise ValueError(f"the embedded preference pairs have a train split only, got {split!r}")
    return _data_config("preference_train", "preference", **overrides)
