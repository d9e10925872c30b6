"""Greedy decoding by full recomputation: one compiled step over a fixed [B, prompt + new] buffer.

Without a KV cache each step costs a full forward, O(S^2) over the sequence; it exists so that a
checkpoint can be sampled and checked against transformers' `generate` before the cache lands. Causal
attention makes the unwritten tail of the buffer invisible to the position being predicted.
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
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
