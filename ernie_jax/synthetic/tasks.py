"""Answer accuracy on the embedded corpora's held-out prompts by greedy completion: arithmetic / algorithmic
tasks (text; as chat for post-training), or questions about rendered images (VQA, for VL models).

One recipe for both: `make_eval_fn` / `make_vqa_eval_fn` build an `eval_fn(model, step) -> metrics` from a
task's `_Task` (how to pick examples, answer them greedily and check the answers) and the held-out LM loss
(`ernie_jax.train.evaluation.heldout_loss`); `print_samples` / `print_vqa_samples` show a few answers.
Answers are decoded by the KV-cache engine (`ernie_jax.generate`); the printed samples can go through MTP
speculative decoding, whose greedy answers are the plain ones, and then report how many drafts were accepted.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np
from flax import nnx

from ernie_jax.data import make_multimodal_pipeline, make_pipeline
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.inference import generate
from ernie_jax.synthetic import text
from ernie_jax.train.evaluation import heldout_loss


def _round_robin(examples: list[dict], n: int) -> list[dict]:
    """The first n examples taking one task after the other (deterministic)."""
    by_task: dict[str, list[dict]] = {}
    for e in examples:
        by_task.setdefault(e["task"], []).append(e)
    return [e for group in itertools.zip_longest(*by_task.values()) for e in group if e is not None][:n]


def pick_examples(n: int) -> list[dict]:
    """n held-out text examples with answers, round-robin over the tasks."""
    return _round_robin([e for e in text.load_examples("heldout") if e["answer"]], n)


def pick_vqa_examples(n: int) -> list[dict]:
    """n held-out VQA examples, round-robin over the question types."""
    from ernie_jax.synthetic import vqa  # noqa: PLC0415 (PIL only for VL runs)
    return _round_robin(vqa.load_examples("heldout"), n)


def _completion(tok: SentencePieceTokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoding them alone would drop a leading space (the
    sentencepiece word marker), so decode prompt + new and cut the decoded prompt off. Ids past the
    tokenizer's pieces (image / video tokens) are left out."""
    text_ids = lambda ids: [i for i in ids if i < tok.vocab_size]  # noqa: E731
    prompt, new = text_ids(prompt), text_ids(new)
    before = tok.decode(prompt)
    after = tok.decode(prompt + new)
    return after[len(before):] if after.startswith(before) else tok.decode(new)


@dataclasses.dataclass(frozen=True)
class _Task:
    pick: Callable[[int], list[dict]]  # n -> held-out examples
    # (model, data config, examples, max new tokens or None, speculative, stats or None) -> greedy completions
    answer: Callable[[nnx.Module, object, list[dict], int | None, str | None, dict | None], list[str]]
    check: Callable[[dict, str], bool]
    describe: Callable[[dict], str]  # the prompt, for printing
    chance: dict[str, float] | None = None  # per task: the best image-blind (answer-prior) accuracy


_COUNTERS = ("generated_tokens", "forwards", "accepted")  # the engine's, summed over `_greedy` calls


def _greedy(model: nnx.Module, prompts: list, max_new: int, eos: int, speculative: str | None,
            stats: dict | None) -> list[list[int]]:
    """Each prompt's greedy new tokens without the eos (the engine keeps it); adds the engine's counters to
    `stats` when given."""
    summary: dict = {}
    outs = generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos, speculative=speculative,
                    stats=summary)
    if stats is not None:
        for k in _COUNTERS:
            stats[k] = stats.get(k, 0) + summary[k]
    return [o[:-1] if o and o[-1] == eos else o for o in outs]


def _rates(stats: dict) -> dict:
    """The summed counters plus the engine's speculative rates over them: accepted drafts per draft, and
    generated tokens per main-model decode forward."""
    fw = max(stats.get("forwards", 0), 1)
    return dict(stats, acceptance_rate=stats.get("accepted", 0) / fw,
                tokens_per_forward=(stats.get("forwards", 0) + stats.get("accepted", 0)) / fw)


def _text_answers(model: nnx.Module, data_cfg, examples: list[dict], max_new: int | None,
                  speculative: str | None = None, stats: dict | None = None) -> list[str]:
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [([tok.bos_id] if data_cfg.add_bos else []) + tok.encode(e["prompt"]).tolist() for e in examples]
    max_new = max_new or max(len(tok.encode(e["answer"])) for e in examples) + 2
    outs = _greedy(model, prompts, max_new, tok.eos_id, speculative, stats)
    return [_completion(tok, p, o) for p, o in zip(prompts, outs)]


def _vqa_answers(model: nnx.Module, data_cfg, examples: list[dict], max_new: int | None,
                 speculative: str | None = None, stats: dict | None = None) -> list[str]:
    from ernie_jax.synthetic.vqa import encode_example_prompt  # noqa: PLC0415
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [encode_example_prompt(e, data_cfg) for e in examples]
    out: list[str] = [""] * len(examples)
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_task.setdefault(e["task"], []).append(i)
    for idx in by_task.values():  # per question type: short answers do not decode for as long as captions
        n_new = max_new or max(len(tok.encode(examples[i]["answer"])) for i in idx) + 2
        outs = _greedy(model, [prompts[i] for i in idx], n_new, tok.eos_id, speculative, stats)
        for i, o in zip(idx, outs):
            out[i] = _completion(tok, prompts[i].input_ids.tolist(), o)
    return out


def _chat_answers(model: nnx.Module, data_cfg, examples: list[dict], max_new: int | None,
                  speculative: str | None = None, stats: dict | None = None) -> list[str]:
    from ernie_jax.posttrain import chat  # noqa: PLC0415
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [chat.prompt(e["messages"], tok).tolist() for e in examples]
    max_new = max_new or max(len(tok.encode(e["answer"])) for e in examples) + 2
    outs = _greedy(model, prompts, max_new, tok.eos_id, speculative, stats)
    return [_completion(tok, p, o) for p, o in zip(prompts, outs)]


def _chat_task() -> _Task:
    from ernie_jax.synthetic import chat_tasks  # noqa: PLC0415
    return _Task(chat_tasks.heldout_prompts, _chat_answers, chat_tasks.check_response, lambda e: repr(e["prompt"]))


def _text_task() -> _Task:
    return _Task(pick_examples, _text_answers, text.check_answer, lambda e: repr(e["prompt"]))


def _vqa_task() -> _Task:
    from ernie_jax.synthetic import vqa  # noqa: PLC0415
    describe = lambda e: repr(" ".join(s["text"] if "text" in s else "<image>" for s in e["segments"]))  # noqa: E731
    return _Task(pick_vqa_examples, _vqa_answers, vqa.check_vqa_answer, describe, vqa.CHANCE)


def _make_eval_fn(task: _Task, data_cfg, batches: list[dict], keys: tuple[str, ...], n_examples: int
                  ) -> Callable[[nnx.Module, int], dict[str, float]]:
    examples = task.pick(n_examples)

    def eval_fn(model: nnx.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if batches:
            metrics["eval/loss"] = heldout_loss(model, batches, keys)
        if examples:
            hits: dict[str, list[bool]] = {}
            for e, got in zip(examples, task.answer(model, data_cfg, examples, None, None, None)):
                hits.setdefault(e["task"], []).append(task.check(e, got))
            for name, h in sorted(hits.items()):
                metrics[f"eval/acc_{name}"] = float(np.mean(h))
            metrics["eval/accuracy"] = float(np.mean([x for h in hits.values() for x in h]))
            if task.chance is not None:
                metrics["eval/chance"] = float(np.mean([task.chance[e["task"]] for e in examples]))
        return metrics

    return eval_fn


def make_eval_fn(data_cfg, heldout_cfg, n_examples: int, lm_batches: int = 4
                 ) -> Callable[[nnx.Module, int], dict[str, float]]:
    """Text corpus: held-out LM loss (packed batches of `heldout_cfg`, none when it is None) and per-task
    accuracy of greedy answers to `n_examples` held-out prompts."""
    batches = []
    if heldout_cfg is not None:
        it = make_pipeline(heldout_cfg)
        batches = [next(it) for _ in range(lm_batches)]
    return _make_eval_fn(_text_task(), data_cfg, batches, ("positions",), n_examples)


def make_vqa_eval_fn(data_cfg, heldout_cfg, n_examples: int, lm_batches: int = 2
                     ) -> Callable[[nnx.Module, int], dict[str, float]]:
    """VQA corpus (VL models): held-out LM loss on packed image batches, accuracy per question type of
    greedy answers to held-out image questions, and `eval/chance` (the best image-blind accuracy over the
    same questions, `vqa.CHANCE`)."""
    from ernie_jax.train.step import VL_KEYS  # noqa: PLC0415
    batches = []
    if heldout_cfg is not None:
        it = make_multimodal_pipeline(heldout_cfg)
        batches = [next(it) for _ in range(lm_batches)]
    return _make_eval_fn(_vqa_task(), data_cfg, batches, VL_KEYS, n_examples)


def make_chat_eval_fn(data_cfg, heldout_cfg, n_examples: int, lm_batches: int = 4
                      ) -> Callable[[nnx.Module, int], dict[str, float]]:
    """The tasks as chat (SFT, DPO, RL): held-out loss on the assistant tokens of packed held-out conversations
    (none when `heldout_cfg` is None) and per-task accuracy of greedy chat answers to `n_examples` held-out
    prompts, an answer right only when it is the whole response (`chat_tasks.check_response`)."""
    from ernie_jax.posttrain.chat_pipeline import make_chat_pipeline  # noqa: PLC0415
    batches = []
    if heldout_cfg is not None:
        it = make_chat_pipeline(heldout_cfg)
        batches = [next(it) for _ in range(lm_batches)]
    return _make_eval_fn(_chat_task(), data_cfg, batches, ("positions",), n_examples)


def print_chat_samples(model: nnx.Module, data_cfg, n: int, speculative: str | None = None) -> dict:
    """Greedy chat answers to n held-out task prompts, with the expected answers; like `print_samples`."""
    return _print(_chat_task(), model, data_cfg, n, None, speculative)


def _print(task: _Task, model: nnx.Module, data_cfg, n: int, max_new: int | None, speculative: str | None
           ) -> dict:
    examples = task.pick(n)
    stats: dict = {}
    for e, got in zip(examples, task.answer(model, data_cfg, examples, max_new, speculative, stats)):
        mark = "ok " if task.check(e, got) else "   "
        print(f"{mark}[{e['task']}] {task.describe(e)} -> {got!r} (expected {e['answer']!r})")
    return _rates(stats)


def print_samples(model: nnx.Module, data_cfg, n: int, max_new: int = 24, speculative: str | None = None
                  ) -> dict:
    """Greedy continuations of n held-out text prompts, with the expected answers. speculative="mtp" decodes
    them with MTP drafts (the same answers). Returns the engine's counters: generated_tokens, forwards,
    accepted, acceptance_rate, tokens_per_forward."""
    return _print(_text_task(), model, data_cfg, n, max_new, speculative)


def print_vqa_samples(model: nnx.Module, data_cfg, n: int, speculative: str | None = None) -> dict:
    """Greedy answers to n held-out image questions, with the expected answers; like `print_samples`."""
    return _print(_vqa_task(), model, data_cfg, n, None, speculative)
