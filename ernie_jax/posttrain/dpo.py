"""Direct preference optimisation (Rafailov et al. 2023) and SimPO (Meng et al. 2024) on shared-question rows.

Each pair sits in one packed row as [prompt | chosen | rejected] (`preference_pipeline`): one forward scores
both replies. `pair_logps` sums the reply tokens' log-probabilities per pair; the reference model's sums are
computed once per batch, before the step, by the frozen reference weights (`WithReference`), so the step
differentiates the policy only.

  DPO:   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
  SimPO: -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)        (no reference model)
  + nll_coef * (-pi_c / |c|)                                            (RPO's NLL term, either loss)

with pi_c, pi_r the policy's summed log-probabilities of the chosen / rejected reply, |c|, |r| their lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.posttrain.preference_pipeline import EXTRA_KEYS

LOSSES = ("dpo", "simpo")
REF_KEYS = ("ref_chosen", "ref_rejected")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    loss: str = "dpo"  # "dpo" | "simpo"
    beta: float = 0.1
    gamma: float = 0.5  # SimPO's target reward margin
    nll_coef: float = 0.0  # + nll_coef * the chosen reply's per-token NLL (RPO, Pang et al. 2024): keeps the
    # chosen answer's likelihood from falling with the rejected one's

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"DPOConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if self.nll_coef < 0:
            raise ValueError(f"DPOConfig.nll_coef must be >= 0, got {self.nll_coef}")

    @property
    def needs_reference(self) -> bool:
        return self.loss == "dpo"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return EXTRA_KEYS + (REF_KEYS if self.needs_reference else ())


def _forward(model: nnx.Module, b: dict) -> jax.Array:
    seg = b["segment_ids"]
    return model(b["tokens"], positions=b["positions"], segment_ids=seg, attention_mask=seg != 0,
                 kv_visible_until=b["kv_visible_until"]).logits


def pair_logps(logits: jax.Array, b: dict, pairs: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [B, S, V], a preference batch -> (chosen, rejected) summed log-probabilities and (chosen,
    rejected) token counts, each [B, P] (pair p of a row is its segment p + 1)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    take = lambda t: jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - logz  # noqa: E731
    lp, lp_alt = take(b["targets"]), take(b["alt_targets"])
    onehot = jax.nn.one_hot(b["segment_ids"] - 1, pairs, dtype=jnp.float32)  # [B, S, P]; padding: zeros
    side, alt = b["side"], b["alt"].astype(jnp.float32)
    chosen = (side == 1).astype(jnp.float32)
    rejected = (side == 2).astype(jnp.float32)
    per = lambda x: jnp.einsum("BS,BSP->BP", x, onehot)  # noqa: E731
    return (per(lp * chosen), per(lp * rejected + lp_alt * alt), per(chosen), per(rejected + alt))


def preference_loss(cfg: DPOConfig, pi_c, pi_r, n_c, n_r, ref_c=None, ref_r=None) -> tuple[jax.Array, dict]:
    """Mean loss over the real pairs (n_c > 0) of [B, P] arrays, and metrics: reward accuracy (the implicit
    reward of the chosen reply above the rejected one's), margin, the chosen / rejected rewards."""
    real = (n_c > 0).astype(jnp.float32)
    if cfg.loss == "dpo":
        r_c, r_r = cfg.beta * (pi_c - ref_c), cfg.beta * (pi_r - ref_r)
        logits = r_c - r_r
    else:
        r_c, r_r = cfg.beta * pi_c / jnp.maximum(n_c, 1), cfg.beta * pi_r / jnp.maximum(n_r, 1)
        logits = r_c - r_r - cfg.gamma
    n = jnp.maximum(jnp.sum(real), 1.0)
    mean = lambda x: jnp.sum(x * real) / n  # noqa: E731
    loss = mean(-jax.nn.log_sigmoid(logits))
    nll = jnp.sum(-pi_c * real) / jnp.maximum(jnp.sum(n_c * real), 1.0)  # per chosen token
    if cfg.nll_coef:
        loss = loss + cfg.nll_coef * nll
    return loss, {"reward_accuracy": mean((r_c > r_r).astype(jnp.float32)), "reward_margin": mean(r_c - r_r),
                  "reward_chosen": mean(r_c), "reward_rejected": mean(r_r), "chosen_nll": nll,
                  "pairs": jnp.sum(real)}


def dpo_objective(cfg: DPOConfig, pairs: int):
    """The train step's `Objective` (`make_train_step(objective=...)`) of `cfg`, for rows of at most `pairs`
    pairs (the data's `max_docs_per_row`)."""
    def objective(model: nnx.Module, mb: dict) -> tuple[jax.Array, dict]:
        pi_c, pi_r, n_c, n_r = pair_logps(_forward(model, mb), mb, pairs)
        refs = (mb["ref_chosen"], mb["ref_rejected"]) if cfg.needs_reference else ()
        return preference_loss(cfg, pi_c, pi_r, n_c, n_r, *refs)
    return objective


class WithReference:
    """The preference pipeline with the frozen reference model's summed log-probabilities added to each batch
    (`ref_chosen`, `ref_rejected` [R, P] float32), computed once per batch when it is drawn; the data state is
    the wrapped pipeline's (the reference sums are recomputed on resume, identically)."""

    def __init__(self, data: Iterator[dict], reference: nnx.Module, pairs: int):
        self.data, self.pairs = data, pairs
        graphdef, state = nnx.split(reference)
        self._state = state

        @jax.jit
        def score(state, b):
            c, r, _, _ = pair_logps(_forward(nnx.merge(graphdef, state), b), b, pairs)
            return c, r

        self._score = score

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        b = next(self.data)
        c, r = self._score(self._state, {k: jnp.asarray(b[k]) for k in ("tokens", "positions", "segment_ids",
                                                                          *EXTRA_KEYS, "targets")})
        return dict(b, ref_chosen=np.asarray(c), ref_rejected=np.asarray(r))

    def get_state(self) -> dict:
        return self.data.get_state()

    def set_state(self, state: dict) -> None:
        self.data.set_state(state)
