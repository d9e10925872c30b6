"""Greedy decoding by full recomputation: one compiled step over a fixed [B, prompt + new] buffer.

Without a KV cache each step costs a full forward, O(S^2) over the sequence; it exists so that a
checkpoint can be sampled and checked against transformers' `generate` before the cache lands. Causal
attention makes the unwritten tail of the buffer invisible to the position being predicted.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _step_fn(graphdef) -> Callable:
    @jax.jit
    def step(state, tokens, t):
        logits = nnx.merge(graphdef, state)(tokens).logits  # [B, T, V]
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), t, axis=1)

    return step


def greedy_steps(model: nnx.Module, prompt: jax.Array, max_new_tokens: int) -> Iterator[jax.Array]:
    """Yields the token buffer [B, P + max_new_tokens] after each new token (for progress reporting).

    prompt: [B, P] int32, all rows of the same length P >= 1.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, p = prompt.shape
    if p + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt {p} + {max_new_tokens} new tokens exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    step = _step_fn(graphdef)
    tokens = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt.astype(jnp.int32))
    for t in range(p, p + max_new_tokens):
        tokens = step(state, tokens, jnp.int32(t))
        yield tokens


def greedy_generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
    """prompt [B, P] -> [B, P + max_new_tokens]: the prompt followed by greedy (argmax) tokens."""
    tokens = jnp.asarray(prompt, jnp.int32)
    for tokens in greedy_steps(model, tokens, max_new_tokens):
        pass
    return tokens


def greedy_generate_ragged(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, *,
                           pad_id: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths, in one compiled step: prompts are left-padded
    to a common length (padding masked out, RoPE positions counted from each prompt's first token).
    Returns the new tokens of each prompt, cut after `eos_id` when given."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("need at least one prompt, each of at least one token")
    n, p = len(prompts), max(len(x) for x in prompts)
    total = p + max_new_tokens
    tokens = np.full((n, total), pad_id, np.int32)
    valid = np.zeros((n, total), bool)
    for i, x in enumerate(prompts):
        tokens[i, p - len(x):p] = x
        valid[i, p - len(x):] = True  # generated positions are valid too
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, t):
        pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        logits = nnx.merge(graphdef, state)(tokens, positions=pos, attention_mask=jnp.asarray(valid)).logits
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), t, axis=1)

    buf = jnp.asarray(tokens)
    for t in range(p, total):
        buf = step(state, buf, jnp.int32(t))
    out = []
    for row in np.asarray(buf)[:, p:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(row)
    return out
