"""Discriminative reward model of the post-training reward (ERNIE 4.5's RDRM): an ERNIE backbone with a scalar
head, trained on preference pairs with the Bradley-Terry loss.

`RewardModel(backbone)`: the backbone's final hidden states [B, S, H] (after the final norm) read at each
sequence's last real token, through `head` (a Linear H -> 1): one reward per conversation. Sequences are
right-padded; the last real token of a rendered conversation is the eos closing the assistant turn, which has
attended to the whole conversation. The LM head's logits go unused and are dropped by XLA under jit.

`train_reward_model` fits it to {"chosen", "rejected"} conversations (`chat_tasks.preference_pairs`) with
`pairwise_loss` = mean(-log sigmoid(r_chosen - r_rejected)) and AdamW; `as_source` makes it a reward source.
A MoE backbone trains too, without its router losses.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ernie_jax.posttrain.chat import render
from ernie_jax.reward.combine import RewardSource

PAD_MULTIPLE = 16


def last_index(attention_mask: jax.Array) -> jax.Array:
    """attention_mask [B, S] (1 real, 0 padding) -> int32 [B], the position of each row's last real token."""
    s = attention_mask.shape[-1]
    return jnp.max(jnp.where(attention_mask != 0, jnp.arange(s, dtype=jnp.int32), 0), axis=-1)


def pairwise_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
    """Bradley-Terry: mean over pairs of -log sigmoid(r_chosen - r_rejected); r_* [P] -> [] fp32."""
    return jnp.mean(-jax.nn.log_sigmoid(r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)))


class RewardModel(nnx.Module):
    """backbone: an `ErnieForCausalLM` (e.g. the SFT model the reward model starts from). head: Linear H -> 1
    in fp32, drawn from `rngs`."""

    def __init__(self, backbone: nnx.Module, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(backbone.config.hidden_size, 1, param_dtype=jnp.float32, rngs=rngs)

    def score(self, ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """ids, attention_mask [B, S] (right-padded; 1 on real tokens) -> fp32 rewards [B]."""
        h = self.backbone(ids, attention_mask=attention_mask).hidden_states  # [B, S, H]
        h_last = jnp.take_along_axis(h, last_index(attention_mask)[:, None, None], axis=1)[:, 0]  # [B, H]
        return self.head(h_last.astype(jnp.float32))[:, 0]

    def score_conversations(self, conversations: Sequence[list[dict]], tokenizer, *,
                            max_batch: int = 16) -> np.ndarray:
        """Training-format conversations (ending with an assistant turn) -> float32 [N] rewards, rendered
        with `chat.render` and scored in groups of `max_batch`, each right-padded to a multiple of 16 tokens
        and a power-of-two row count (one compiled forward per (rows, length) bucket)."""
        seqs = [render(c, tokenizer, index=i).ids for i, c in enumerate(conversations)]
        limit = self.backbone.config.max_position_embeddings
        for i, s in enumerate(seqs):
            if len(s) > limit:
                raise ValueError(f"RewardModel: conversation {i} has {len(s)} tokens, more than "
                                 f"max_position_embeddings={limit}")
        graphdef, state = nnx.split(self)
        out = np.zeros(len(seqs), np.float32)
        for start in range(0, len(seqs), max_batch):
            part = seqs[start:start + max_batch]
            rows = min(max_batch, 1 << (len(part) - 1).bit_length())
            ids, mask = pad_batch(part, rows=rows, length=_bucket(part))
            out[start:start + len(part)] = np.asarray(_score(graphdef, state, jnp.asarray(ids),
                                                             jnp.asarray(mask)))[:len(part)]
        return out

    def as_source(self, tokenizer, *, name: str = "rdrm", weight: float = 1.0, normalize: bool = True,
                  max_batch: int = 16):
        """A `RewardSource`: the reward of the conversation example["messages"] (the prompt's turns;
        default one user turn example["prompt"]) + the response as the assistant turn. A blank response does
        not render (a counted failure)."""
        def conversation(example: dict, response: str) -> list[dict]:
            turns = example.get("messages") or [{"role": "user", "content": example["prompt"]}]
            return list(turns) + [{"role": "assistant", "content": response}]

        def fn(example: dict, response: str) -> float:
            return float(self.score_conversations([conversation(example, response)], tokenizer)[0])

        def batch_fn(examples: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
            return self.score_conversations([conversation(e, r) for e, r in zip(examples, responses)], tokenizer,
                                            max_batch=max_batch)

        return RewardSource(name, fn, weight=weight, normalize=normalize, batch_fn=batch_fn)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).score(ids, mask)


def _bucket(seqs: Sequence[np.ndarray]) -> int:
    return -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE


def pad_batch(seqs: Sequence[np.ndarray], *, rows: int, length: int, pad_id: int = 0):
    """Id sequences -> (ids, attention_mask) int32 [rows, length], right-padded; rows past len(seqs) hold one
    pad token (their rewards are junk)."""
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    mask[len(seqs):, 0] = 1
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def train_reward_model(rm: RewardModel, pairs: Sequence[dict], tokenizer, *, steps: int, lr: float = 1e-4,
                       batch_size: int = 16, seed: int = 0, weight_decay: float = 0.0,
                       seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Fit `rm` in place to preference pairs {"chosen": messages, "rejected": messages} for `steps` AdamW steps
    of `batch_size` pairs (epochs of a permutation drawn from `seed`). Every conversation is padded to
    `seq_len` (default: the longest, rounded up to 16), so the jitted step compiles once; each step scores the
    chosen and rejected halves in one [2 * batch_size, seq_len] forward. Returns per-step arrays [steps]:
    "loss" (`pairwise_loss`) and "accuracy" (fraction of the batch's pairs with r_chosen > r_rejected), both
    before that step's update."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_reward_model: steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"train_reward_model: lr must be > 0, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(pairs):
        raise ValueError(f"train_reward_model: batch_size must be an int in [1, {len(pairs)}] (the number of "
                         f"pairs), got {batch_size!r}")
    chosen = [render(p["chosen"], tokenizer, index=i).ids for i, p in enumerate(pairs)]
    rejected = [render(p["rejected"], tokenizer, index=i).ids for i, p in enumerate(pairs)]
    longest = max(max(len(s) for s in chosen), max(len(s) for s in rejected))
    length = _bucket(chosen + rejected) if seq_len is None else seq_len
    if longest > length or longest > rm.backbone.config.max_position_embeddings:
        raise ValueError(f"train_reward_model: the longest conversation has {longest} tokens, more than "
                         f"seq_len={seq_len} or max_position_embeddings="
                         f"{rm.backbone.config.max_position_embeddings}")
    c_ids, c_mask = pad_batch(chosen, rows=len(pairs), length=length)
    r_ids, r_mask = pad_batch(rejected, rows=len(pairs), length=length)

    tx = optax.adamw(lr, weight_decay=weight_decay)
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    opt_state = tx.init(params)

    def loss_fn(params, rest, ids, mask):
        r = nnx.merge(graphdef, params, rest).score(ids, mask)
        r_c, r_r = r[:batch_size], r[batch_size:]
        return pairwise_loss(r_c, r_r), jnp.mean((r_c > r_r).astype(jnp.float32))

    @jax.jit
    def step(params, opt_state, rest, ids, mask):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, ids, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    losses, accs = np.zeros(steps, np.float32), np.zeros(steps, np.float32)
    for t in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(pairs))])
        idx, order = order[:batch_size], order[batch_size:]
        ids = jnp.asarray(np.concatenate([c_ids[idx], r_ids[idx]]))
        mask = jnp.asarray(np.concatenate([c_mask[idx], r_mask[idx]]))
        params, opt_state, loss, acc = step(params, opt_state, rest, ids, mask)
        losses[t], accs[t] = loss, acc
    nnx.update(rm, params)
    return {"loss": losses, "accuracy": accs}
