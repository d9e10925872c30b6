"""Reference-based generative judge of the post-training reward (ERNIE 4.5's RLLM): a language model served by
our code reads (question, reference answer, response) and says whether the response is right.

`ReferenceJudge(model, tokenizer)` fills `template` with the three texts, renders it as one user turn in
ERNIE's chat format (`chat.prompt`: the ids the model continues after "Assistant: ") and scores the response
with P(yes) / (P(yes) + P(no)) from the next-token distribution after that prompt: the softmax restricted to
the first token of `yes` and of `no` (`tokenizer.encode(yes)[0]`). With the embedded 512-piece tokenizer
" yes" encodes as "▁y" "es" and " no" as "▁n" "o", so the judge compares "▁y" with "▁n": the first token a
judge answering " yes" / " no" emits (the chat format leaves the space after "Assistant:" to that token). The
answers must encode without unk pieces (the tiny tokenizer has no capitals: " Yes" is "▁" unk "es") and their
first tokens must differ, else the constructor raises.

Batched scoring: prompts are sorted by length, cut into groups of at most `max_batch` rows, each right-padded
to a multiple of 16 tokens (and its row count to a power of two) with an attention mask, and run through one
jitted forward (`nnx.split` / `nnx.merge`, compiled once per (rows, length) bucket) that reads the hidden state
at each prompt's last real token and applies the LM head there only. A verdict needs one next-token
distribution, not decoding, so this is a plain forward rather than the KV-cache `Engine`.
"""

from __future__ import annotations

import functools
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.posttrain import chat
from ernie_jax.reward.combine import RewardSource
from ernie_jax.reward.reward_model import PAD_MULTIPLE, last_index, pad_batch

DEFAULT_TEMPLATE = ("Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
                    "Does the response give the reference answer? Answer yes or no.")
FIELDS = ("question", "reference", "response")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _yes_probability(graphdef, state, ids, mask, yes_no):
    """ids, mask [B, S] (right-padded), yes_no [2] -> P(yes) / (P(yes) + P(no)) [B] after each row's last real
    token."""
    model = nnx.merge(graphdef, state)
    h = model(ids, attention_mask=mask).hidden_states  # [B, S, H]; the [B, S, V] logits are dropped by XLA
    h_last = jnp.take_along_axis(h, last_index(mask)[:, None, None], axis=1)  # [B, 1, H]
    logits = model._head(h_last)[:, 0]  # [B, V] fp32
    return jax.nn.softmax(logits[:, yes_no], axis=-1)[:, 0]


class ReferenceJudge:
    """model: an `ErnieForCausalLM` (a judge fine-tuned to answer yes / no; any weights run). tokenizer:
    `encode(str)`, `bos_id`, `eos_id` (and `unk_id` when it has one). template: a str.format pattern with the
    fields {question}, {reference}, {response}. yes / no: the answers whose first tokens are compared.
    max_batch: rows per forward."""

    def __init__(self, model: nnx.Module, tokenizer, *, template: str = DEFAULT_TEMPLATE, yes: str = " yes",
                 no: str = " no", max_batch: int = 16):
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None} \
            if isinstance(template, str) else None
        if fields != set(FIELDS):
            raise ValueError(f"ReferenceJudge: template must be a str with exactly the fields {FIELDS}, "
                             f"got fields {sorted(fields) if fields is not None else None} in {template!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"ReferenceJudge: max_batch must be an int >= 1, got {max_batch!r}")
        self.model, self.tokenizer, self.template, self.max_batch = model, tokenizer, template, max_batch
        self.yes_id, self.no_id = self._first_id("yes", yes), self._first_id("no", no)
        if self.yes_id == self.no_id:
            raise ValueError(f"ReferenceJudge: yes={yes!r} and no={no!r} start with the same token "
                             f"{self.yes_id}; the judge could not tell them apart")

    def _first_id(self, arg: str, text: str) -> int:
        ids = self.tokenizer.encode(text) if isinstance(text, str) else []
        if len(ids) == 0:
            raise ValueError(f"ReferenceJudge: {arg}={text!r} encodes to no tokens")
        first, unk = int(ids[0]), getattr(self.tokenizer, "unk_id", None)
        if unk is not None and unk in [int(i) for i in ids]:
            raise ValueError(f"ReferenceJudge: {arg}={text!r} has characters the tokenizer does not cover (ids "
                             f"{[int(i) for i in ids]}, unk {unk}); pick an answer it encodes")
        if not 0 <= first < self.model.config.vocab_size:
            raise ValueError(f"ReferenceJudge: {arg}={text!r} starts with token {first}, outside the model's "
                             f"vocabulary of {self.model.config.vocab_size}")
        return first

    def prompt_ids(self, question: str, reference: str, response: str) -> np.ndarray:
        """The judge prompt's ids [S]: the filled template as a user turn, with the generation prompt."""
        content = self.template.format(question=question, reference=reference, response=response)
        return chat.prompt([{"role": "user", "content": content}], self.tokenizer)

    def score_ids(self, prompts: Sequence[np.ndarray]) -> np.ndarray:
        """Judge prompts (id sequences) -> float32 [N] P(yes) / (P(yes) + P(no)) after each."""
        prompts = [np.asarray(p, np.int32) for p in prompts]
        limit = self.model.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if p.ndim != 1 or not 0 < p.size <= limit:
                raise ValueError(f"ReferenceJudge: prompt {i} must be 1..{limit} token ids "
                                 f"(max_position_embeddings), got shape {p.shape}")
        graphdef, state = nnx.split(self.model)  # now: the judge's current weights
        order = np.argsort([p.size for p in prompts], kind="stable")
        out = np.zeros(len(prompts), np.float32)
        yes_no = jnp.asarray([self.yes_id, self.no_id], jnp.int32)
        for start in range(0, len(prompts), self.max_batch):
            idx = order[start:start + self.max_batch]
            rows = min(self.max_batch, 1 << (len(idx) - 1).bit_length())
            part = [prompts[i] for i in idx]
            length = -(-max(p.size for p in part) // PAD_MULTIPLE) * PAD_MULTIPLE
            ids, mask = pad_batch(part, rows=rows, length=length)
            p = _yes_probability(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), yes_no)
            out[idx] = np.asarray(p)[:len(idx)]
        return out

    def score(self, questions: Sequence[str], references: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """N (question, reference answer, response) -> float32 [N] in [0, 1], the judge's P(yes)."""
        if not (len(questions) == len(references) == len(responses)) or len(questions) == 0:
            raise ValueError(f"ReferenceJudge.score: questions, references and responses must be non-empty and of "
                             f"the same length, got {len(questions)}, {len(references)}, {len(responses)}")
        for arg, texts in (("questions", questions), ("references", references), ("responses", responses)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise ValueError(f"ReferenceJudge.score: {arg}[{i}] must be a str, got {type(t).__name__}")
        return self.score_ids([self.prompt_ids(q, r, a) for q, r, a in zip(questions, references, responses)])

    def as_source(self, name: str = "rllm", weight: float = 1.0, normalize: bool = True):
        """A `RewardSource` judging each response against example["prompt"] / example["answer"], with
        the batched path (one `score` call for the batch)."""
        def fn(example: dict, response: str) -> float:
            return float(self.score([example["prompt"]], [example["answer"]], [response])[0])

        def batch_fn(examples: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
            return self.score([e["prompt"] for e in examples], [e["answer"] for e in examples], responses)

        return RewardSource(name, fn, weight=weight, normalize=normalize, batch_fn=batch_fn)
