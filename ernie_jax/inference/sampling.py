"""Sampling the next token: greedy, temperature, top-k, top-p, seeded per request.

Every parameter is per row ([B] arrays), so requests with different settings share one compiled decode step.
The order is transformers' (temperature, then top-k, then top-p). A row's random key is derived from its own
seed and the number of tokens it has generated (`row_keys`), never from the batch: a request draws the same
tokens whichever slot or batch it runs in.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 keeps every token; top_p in (0, 1], 1 keeps every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """seeds [B] uint32, counters [B] int -> one PRNG key per row: `fold_in(key(seed), counter)`."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> tempered logits [B, V] with the tokens outside top-k / top-p at -inf.

    temperature [B] (rows with 0 are divided by 1: their argmax is what counts), top_k [B] int (0: all),
    top_p [B] float. Top-k keeps the tokens whose logit is >= the k-th largest (ties kept); top-p keeps the
    most likely tokens up to and including the first whose cumulative probability reaches top_p (at least one).
    """
    v = logits.shape[-1]
    x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    desc = -jnp.sort(-x, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    x = jnp.where(x >= kth, x, _NEG)
    desc = jnp.where(jnp.arange(v)[None, :] < k[:, None], desc, _NEG)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
    keep = before < top_p[:, None]
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    return jnp.where(x >= cutoff, x, _NEG)


def _unless_all_greedy(temperature: jax.Array, greedy: jax.Array, sampled) -> jax.Array:
    """`sampled()` where temperature > 0, `greedy` elsewhere; a batch of greedy rows skips the vocabulary sort
    of `filter_logits` altogether."""
    hot = (temperature > 0).reshape((-1,) + (1,) * (greedy.ndim - 1))
    return jax.lax.cond(jnp.any(temperature > 0), lambda: jnp.where(hot, sampled(), greedy), lambda: greedy)


def distribution(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The distribution [B, V] fp32 a row samples from: one-hot of the argmax for greedy rows."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return _unless_all_greedy(temperature, greedy, lambda: jax.nn.softmax(
        filter_logits(logits, temperature, top_k, top_p), axis=-1))


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array) -> jax.Array:
    """logits [B, V], per-row parameters [B] and keys [B] -> tokens [B] int32 (argmax where temperature is 0)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _unless_all_greedy(temperature, greedy, lambda: jax.vmap(jax.random.categorical)(
        keys, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32))


def sample_from(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """probs [B, V] (rows summing to 1, zeros allowed) and keys [B] -> tokens [B] int32."""
    return jax.vmap(jax.random.categorical)(keys, jnp.log(probs)).astype(jnp.int32)
