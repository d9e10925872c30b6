"""GRPO (Shao et al. 2024) with DAPO's changes (Yu et al. 2025): the policy-gradient objective of RL with
verifiable rewards, and how a batch of rollouts becomes its training rows.

A prompt is answered G times (`rl_loop` samples them from the inference engine). Each answer's advantage is
its reward normalised within its group, `(r - mean) / (std + eps)` (no critic). **Dynamic sampling** (DAPO)
drops the groups whose rewards are all equal (every answer right or every answer wrong: zero advantage, no
gradient) and the loop draws more prompts until the batch is full. The loss, per response token t of answer i,

    ratio = exp(logp_t - old_logp_t)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - clip_low, 1 + clip_high) * A_i) + kl_coef * KL_t

with clip-higher (clip_high > clip_low, DAPO) and the k3 estimator of KL to the reference,
`exp(ref - logp) - (ref - logp) - 1` (off by default, as in DAPO). `loss_agg="token"` averages over every
response token of the batch (DAPO's token-level loss: long answers weigh by their length); `"sequence"` averages
each answer's tokens first (GRPO). The **overlong penalty** (DAPO's soft punishment) lowers the reward of an
answer longer than `max_new_tokens - overlong_buffer` linearly down to -`overlong_penalty` at the limit.

Rows (`pack_rollouts`), [R, S] unless said: tokens, targets, positions, segment_ids (one answer per segment,
its prompt included), loss_mask (1 on the answer's tokens, its eos included when it stopped),
advantages, old_logp, ref_logp (float32).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LOSS_AGG = ("token", "sequence")
EXTRA_KEYS = ("advantages", "old_logp", "ref_logp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    group_size: int = 8  # G answers per prompt
    prompts_per_step: int = 8  # groups per update (after dynamic sampling)
    max_new_tokens: int = 16
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher; = clip_low for GRPO's symmetric clip
    kl_coef: float = 0.0  # KL to the reference (GRPO: 0.04; DAPO: 0)
    loss_agg: str = "token"
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 4  # prompt draws per step before training on what was kept
    updates_per_batch: int = 1  # optimizer steps on each batch of rollouts (GRPO's mu; > 1 makes the clip bite)
    overlong_buffer: int = 4  # tokens before max_new_tokens where the overlong penalty starts
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens (0: off)
    adv_eps: float = 1e-6

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2 (a group normalises its rewards), got "
                             f"{self.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "max_sampling_rounds", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"GRPOConfig clip range (clip_low={self.clip_low}, clip_high={self.clip_high}) must "
                             "have 0 <= clip_low < 1 and clip_high >= 0")
        if self.loss_agg not in LOSS_AGG:
            raise ValueError(f"GRPOConfig.loss_agg must be one of {LOSS_AGG}, got {self.loss_agg!r}")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(f"GRPOConfig.overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}), "
                             f"got {self.overlong_buffer}")
        if self.temperature <= 0 or self.kl_coef < 0 or self.overlong_penalty < 0:
            raise ValueError("GRPOConfig: temperature must be > 0, kl_coef and overlong_penalty >= 0")


def overlong_penalty(lengths: np.ndarray, cfg: GRPOConfig) -> np.ndarray:
    """[N] answer lengths -> [N] rewards to add: 0 up to max_new_tokens - overlong_buffer, then linear down to
    -overlong_penalty at max_new_tokens."""
    if not cfg.overlong_penalty:
        return np.zeros(len(lengths), np.float32)
    start = cfg.max_new_tokens - cfg.overlong_buffer
    over = np.clip(np.asarray(lengths, np.float32) - start, 0, None) / max(cfg.overlong_buffer, 1)
    return (-cfg.overlong_penalty * np.minimum(over, 1.0)).astype(np.float32)


def group_advantages(rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """[P, G] rewards -> [P, G] advantages: each group's rewards minus their mean over their std (ddof 1)."""
    r = np.asarray(rewards, np.float64)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)).astype(np.float32)


def informative_groups(rewards: np.ndarray) -> np.ndarray:
    """[P, G] rewards -> [P] bool: the groups whose rewards are not all equal (DAPO's dynamic sampling keeps them)."""
    r = np.asarray(rewards)
    return ~np.all(r == r[:, :1], axis=1)


def pack_rollouts(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], advantages: Sequence[float],
                  *, rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Each prompt + answer (token ids) as one segment, first fit into `rows` rows of `seq_len` positions; the
    answer's targets carry its advantage. A sequence longer than seq_len + 1, or more than fit, is an error."""
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
    out = {k: np.zeros((rows, seq_len), np.int32) for k in keys}
    out["tokens"][:] = out["targets"][:] = pad_id
    out["advantages"] = np.zeros((rows, seq_len), np.float32)
    used, segs = [0] * rows, [0] * rows
    for i, (p, a, adv) in enumerate(zip(prompts, answers, advantages)):
        seq = np.asarray(list(p) + list(a), np.int32)
        n = len(seq) - 1
        if n > seq_len:
            raise ValueError(f"rollout {i}: prompt {len(p)} + answer {len(a)} tokens do not fit seq_len={seq_len} + 1")
        r = next((r for r in range(rows) if used[r] + n <= seq_len), None)
        if r is None:
            raise ValueError(f"rollout {i}: {len(prompts)} rollouts do not fit {rows} rows of {seq_len}")
        o = used[r]
        segs[r] += 1
        out["tokens"][r, o:o + n], out["targets"][r, o:o + n] = seq[:-1], seq[1:]
        out["positions"][r, o:o + n] = np.arange(n)
        out["segment_ids"][r, o:o + n] = segs[r]
        out["loss_mask"][r, o + len(p) - 1:o + n] = 1  # the targets that are answer tokens
        out["advantages"][r, o + len(p) - 1:o + n] = adv
        used[r] += n
    return out


def token_logps(model: nnx.Module, b: dict) -> tuple[jax.Array, jax.Array]:
    """[B, S] log-probability of each target under `model` (packed rows), and [B, S] the entropy of the
    model's next-token distribution there."""
    seg = b["segment_ids"]
    logits = model(b["tokens"], positions=b["positions"], segment_ids=seg, attention_mask=seg != 0).logits
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return jnp.take_along_axis(logp_all, b["targets"][..., None], axis=-1)[..., 0], entropy


def grpo_loss(cfg: GRPOConfig, logp, b: dict, entropy=None) -> tuple[jax.Array, dict]:
    """The clipped surrogate (+ KL) of `logp` [B, S] over the rows `b`, and its metrics (`entropy` [B, S]:
    the policy's entropy on the answer tokens, reported only)."""
    m = b["loss_mask"].astype(jnp.float32)
    adv, old = b["advantages"], b["old_logp"]
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    kl = jnp.exp(b["ref_logp"] - logp) - (b["ref_logp"] - logp) - 1
    if cfg.kl_coef:
        per_token = per_token + cfg.kl_coef * kl
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    if cfg.loss_agg == "token":
        loss = jnp.sum(per_token * m) / tokens
    else:  # each answer's mean, then the mean over answers
        onehot = jax.nn.one_hot(b["segment_ids"] - 1, b["segment_ids"].shape[1], dtype=jnp.float32)  # [B, S, N]
        per_seq = jnp.einsum("BS,BSN->BN", per_token * m, onehot)
        n_seq = jnp.einsum("BS,BSN->BN", m, onehot)
        real = (n_seq > 0).astype(jnp.float32)
        loss = jnp.sum(per_seq / jnp.maximum(n_seq, 1.0)) / jnp.maximum(jnp.sum(real), 1.0)
    clip_frac = jnp.sum(((ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)) * m) / tokens
    metrics = {"kl": jnp.sum(kl * m) / tokens, "clip_fraction": clip_frac}
    if entropy is not None:
        metrics["entropy"] = jax.lax.stop_gradient(jnp.sum(entropy * m) / tokens)
    return loss, metrics


def grpo_objective(cfg: GRPOConfig):
    """The train step's `Objective` (`make_train_step(objective=..., batch_keys=EXTRA_KEYS)`)."""
    def objective(model: nnx.Module, mb: dict) -> tuple[jax.Array, dict]:
        logp, entropy = token_logps(model, mb)
        return grpo_loss(cfg, logp, mb, entropy)
    return objective
