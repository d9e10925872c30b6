"""Evaluation of the embedded default corpus during and after training: held-out LM loss, and task
accuracy by greedy completion of held-out prompts (arithmetic, sorting, ... with checkable answers)."""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.data import make_pipeline, synthetic
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.inference.greedy import greedy_generate_ragged
from ernie_jax.losses import token_cross_entropy


def pick_examples(n: int) -> list[dict]:
    """n held-out examples with answers, round-robin over the tasks (deterministic)."""
    by_task: dict[str, list[dict]] = {}
    for e in synthetic.load_examples("heldout"):
        if e["answer"]:
            by_task.setdefault(e["task"], []).append(e)
    rr = [e for group in itertools.zip_longest(*by_task.values()) for e in group if e is not None]
    return rr[:n]


def _completion(tok: SentencePieceTokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoding them alone would drop a leading space (the
    sentencepiece word marker), so decode prompt + new and cut the decoded prompt off."""
    before = tok.decode(prompt)
    after = tok.decode(prompt + list(new))
    return after[len(before):] if after.startswith(before) else tok.decode(new)


def make_eval_fn(data_cfg, heldout_cfg, n_examples: int, lm_batches: int = 4
                 ) -> Callable[[nnx.Module, int], dict[str, float]]:
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    examples = pick_examples(n_examples)
    prompts = [([tok.bos_id] if data_cfg.add_bos else []) + tok.encode(e["prompt"]).tolist() for e in examples]
    max_new = max(len(tok.encode(e["answer"])) for e in examples) + 2
    batches = []
    if heldout_cfg is not None:
        it = make_pipeline(heldout_cfg)
        batches = [next(it) for _ in range(lm_batches)]

    def eval_fn(model: nnx.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if batches:
            g, st = nnx.split(model)
            ce = jax.jit(lambda st, b: token_cross_entropy(nnx.merge(g, st)(
                b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]).logits, b["targets"]))
            tot = cnt = 0.0
            for b in batches:
                jb = {k: jnp.asarray(b[k]) for k in ("tokens", "targets", "positions", "segment_ids")}
                m = np.asarray(b["loss_mask"], np.float32)
                tot += float(np.sum(np.asarray(ce(st, jb)) * m))
                cnt += float(m.sum())
            metrics["eval/loss"] = tot / max(cnt, 1.0)
        if examples:
            outs = greedy_generate_ragged(model, prompts, max_new, pad_id=data_cfg.pad_id, eos_id=tok.eos_id)
            hits: dict[str, list[bool]] = {}
            for e, p, o in zip(examples, prompts, outs):
                hits.setdefault(e["task"], []).append(synthetic.check_answer(e, _completion(tok, p, o)))
            for task, h in sorted(hits.items()):
                metrics[f"eval/acc_{task}"] = float(np.mean(h))
            metrics["eval/accuracy"] = float(np.mean([x for h in hits.values() for x in h]))
        return metrics

    return eval_fn


def print_samples(model: nnx.Module, data_cfg, n: int, max_new: int = 24) -> None:
    """Greedy continuations of n held-out prompts, with the expected answers."""
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    examples = pick_examples(n)
    prompts = [([tok.bos_id] if data_cfg.add_bos else []) + tok.encode(e["prompt"]).tolist() for e in examples]
    for e, p, o in zip(examples, prompts, greedy_generate_ragged(model, prompts, max_new, pad_id=data_cfg.pad_id,
                                                                eos_id=tok.eos_id)):
        got = _completion(tok, p, o)
        mark = "ok " if synthetic.check_answer(e, got) else "   "
        print(f"{mark}[{e['task']}] {e['prompt']!r} -> {got!r} (expected {e['answer']!r})")


# ------------------------------------------------------------------------------------------- VQA (VL)
def pick_vqa_examples(n: int) -> list[dict]:
    """n held-out VQA examples, round-robin over the question types (deterministic)."""
    from ernie_jax.data import synthetic_vqa  # noqa: PLC0415 (PIL only for VL runs)
    by_task: dict[str, list[dict]] = {}
    for e in synthetic_vqa.load_examples("heldout"):
        by_task.setdefault(e["task"], []).append(e)
    rr = [e for group in itertools.zip_longest(*by_task.values()) for e in group if e is not None]
    return rr[:n]


def _vqa_answers(model: nnx.Module, data_cfg, examples: list[dict]) -> list[str]:
    from ernie_jax.data.multimodal import encode_example_prompt  # noqa: PLC0415
    from ernie_jax.inference.greedy import greedy_generate_multimodal  # noqa: PLC0415
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [encode_example_prompt(e, data_cfg) for e in examples]
    max_new = max(len(tok.encode(e["answer"])) for e in examples) + 2
    outs = greedy_generate_multimodal(model, prompts, max_new, pad_id=data_cfg.pad_id, eos_id=tok.eos_id)
    text = lambda ids: [i for i in ids if i < tok.vocab_size]  # noqa: E731 (image ids are no sentencepiece pieces)
    return [_completion(tok, text(p.input_ids.tolist()), text(o)) for p, o in zip(prompts, outs)]


def make_vqa_eval_fn(data_cfg, heldout_cfg, n_examples: int, lm_batches: int = 2
                     ) -> Callable[[nnx.Module, int], dict[str, float]]:
    """Held-out LM loss on VQA batches and answer accuracy per question type (greedy answers to held-out
    image questions), with `eval/chance` the accuracy of uniform guessing over the same examples."""
    from ernie_jax.data import synthetic_vqa  # noqa: PLC0415
    from ernie_jax.data.multimodal import make_multimodal_pipeline  # noqa: PLC0415
    from ernie_jax.train.step import VL_KEYS  # noqa: PLC0415
    examples = pick_vqa_examples(n_examples)
    batches = []
    if heldout_cfg is not None:
        it = make_multimodal_pipeline(heldout_cfg)
        batches = [next(it) for _ in range(lm_batches)]

    def eval_fn(model: nnx.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if batches:
            g, st = nnx.split(model)
            ce = jax.jit(lambda st, b: token_cross_entropy(nnx.merge(g, st)(
                b["tokens"], segment_ids=b["segment_ids"], attention_mask=b["segment_ids"] != 0,
                **{k: b[k] for k in VL_KEYS}).logits, b["targets"]))
            tot = cnt = 0.0
            for b in batches:
                jb = {k: jnp.asarray(b[k]) for k in ("tokens", "targets", "segment_ids") + VL_KEYS}
                m = np.asarray(b["loss_mask"], np.float32)
                tot += float(np.sum(np.asarray(ce(st, jb)) * m))
                cnt += float(m.sum())
            metrics["eval/loss"] = tot / max(cnt, 1.0)
        if examples:
            hits: dict[str, list[bool]] = {}
            for e, got in zip(examples, _vqa_answers(model, data_cfg, examples)):
                hits.setdefault(e["task"], []).append(synthetic_vqa.check_vqa_answer(e, got))
            for task, h in sorted(hits.items()):
                metrics[f"eval/acc_{task}"] = float(np.mean(h))
            metrics["eval/accuracy"] = float(np.mean([x for h in hits.values() for x in h]))
            metrics["eval/chance"] = float(np.mean([synthetic_vqa.CHANCE[e["task"]] for e in examples]))
        return metrics

    return eval_fn


def print_vqa_samples(model: nnx.Module, data_cfg, n: int) -> None:
    """Greedy answers to n held-out image questions, with the expected answers."""
    from ernie_jax.data import synthetic_vqa  # noqa: PLC0415
    examples = pick_vqa_examples(n)
    for e, got in zip(examples, _vqa_answers(model, data_cfg, examples)):
        mark = "ok " if synthetic_vqa.check_vqa_answer(e, got) else "   "
        text = " ".join(s["text"] if "text" in s else "<image>" for s in e["segments"])
        print(f"{mark}[{e['task']}] {text!r} -> {got!r} (expected {e['answer']!r})")
