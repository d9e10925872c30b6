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

    return _new_tokens(lambda buf, t: step(state, buf, t), tokens, p, eos_id)


def _new_tokens(step: Callable, tokens: np.ndarray, p: int, eos_id: int | None) -> list[list[int]]:
    """Runs `step(buf, t)` for t = p .. end of the buffer; the tokens after p of each row, cut at eos."""
    buf = jnp.asarray(tokens)
    for t in range(p, tokens.shape[1]):
        buf = step(buf, jnp.int32(t))
    out = []
    for row in np.asarray(buf)[:, p:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(row)
    return out


def greedy_generate_multimodal(model: nnx.Module, prompts: list, max_new_tokens: int, *, pad_id: int = 0,
                               eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuations of VL prompts (`ernie_jax.processor.prompt.EncodedPrompt`s: token ids, type ids,
    images, videos) in one compiled step. Prompts are left-padded to a common length; the 3D positions come
    from `rope_index` over the attended tokens (transformers' rule for padded batches), generated tokens are
    text. Every step recomputes the whole buffer, images included (no KV cache yet). Returns the new tokens
    of each prompt, cut after `eos_id` when given."""
    if not prompts:
        raise ValueError("need at least one prompt")
    n, p = len(prompts), max(len(x.input_ids) for x in prompts)
    total = p + max_new_tokens
    cols = {k: np.zeros((n, total), np.int32) for k in ("mm_token_type_ids", "moe_mm_token_type_ids")}
    tokens = np.full((n, total), pad_id, np.int32)
    valid = np.zeros((n, total), bool)
    for i, x in enumerate(prompts):
        s = p - len(x.input_ids)
        tokens[i, s:p] = x.input_ids
        valid[i, s:] = True  # generated positions are valid too
        for k in cols:
            cols[k][i, s:p] = getattr(x, k)
    inputs = {**{k: jnp.asarray(v) for k, v in cols.items()}, "attention_mask": jnp.asarray(valid)}
    for kind, pix, grid in (("images", "pixel_values", "image_grid_thw"),
                            ("videos", "pixel_values_videos", "video_grid_thw")):
        items = [v for x in prompts for v in getattr(x, kind)]
        if items:
            inputs[pix] = jnp.asarray(np.concatenate([v.patches for v in items]), jnp.float32)
            inputs[grid] = jnp.asarray(np.stack([v.grid_thw for v in items]), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, t, inputs):
        logits = nnx.merge(graphdef, state)(tokens, **inputs).logits
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), t, axis=1)

    return _new_tokens(lambda buf, t: step(state, buf, t, inputs), tokens, p, eos_id)
