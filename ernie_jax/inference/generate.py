"""`generate(model, prompts, ...)`: continuations of a batch of prompts through the `Engine`.

Every argument is checked before anything compiles; a bad one raises `ValueError` naming it and its value.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from flax import nnx

from ernie_jax.inference.engine import SPECULATIVE, Engine
from ernie_jax.inference.sampling import SamplingParams
from ernie_jax.quantization.kv_cache import KVCacheConfig, resolve as resolve_kv_cache

_CONFIG = object()  # eos_token_id default: the config's


def _is_vl_prompt(p: Any) -> bool:
    return hasattr(p, "input_ids") and hasattr(p, "images")


def check_prompt(model: nnx.Module, prompt: Any, max_new_tokens: int, max_len: int, where: str) -> None:
    """Raises ValueError naming `where` when the prompt cannot be decoded by this model within max_len."""
    c = model.config
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if _is_vl_prompt(prompt):
        if c.vision is None:
            raise ValueError(f"{where} is a multimodal prompt (images {len(prompt.images)}, videos "
                             f"{len(prompt.videos)}) but the model is a text model (config.vision is None)")
        ids = np.asarray(prompt.input_ids)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        ids = np.asarray(prompt, np.int64)
    else:
        raise ValueError(f"{where} must be a list of token ids (or an EncodedPrompt for VL models), got "
                         f"{type(prompt).__name__}")
    if ids.size == 0:
        raise ValueError(f"{where} is empty: a prompt needs at least one token")
    bad = (ids < 0) | (ids >= c.vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where} has token id {int(ids[i])} at position {i}, outside the vocabulary "
                         f"[0, vocab_size={c.vocab_size})")
    total = ids.size + max_new_tokens
    if total > c.max_position_embeddings:
        raise ValueError(f"{where}: {ids.size} prompt tokens + max_new_tokens={max_new_tokens} = {total} exceeds "
                         f"max_position_embeddings={c.max_position_embeddings}")
    if total > max_len:
        raise ValueError(f"{where}: {ids.size} prompt tokens + max_new_tokens={max_new_tokens} = {total} exceeds "
                         f"the cache length max_len={max_len}")


def generate(model: nnx.Module, prompts: Sequence[Any], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id: Any = _CONFIG,
             stop_sequences: Sequence[Sequence[int]] = (), speculative: str | None = None,
             max_batch: int | None = None, chunk: int = 8, mesh=None, rules=None,
             kv_cache: KVCacheConfig | None = None, stats: dict | None = None) -> list[list[int]]:
    """Each prompt's new tokens (at most `max_new_tokens`, cut after eos or a stop sequence).

    prompts: token-id lists (text models) or `ernie_jax.processor.prompt.EncodedPrompt`s (VL models).
    temperature 0 is greedy; top_k 0 / top_p 1 filter nothing. Prompt i samples with seed `seed + i`, so its
    tokens do not depend on the batch it runs in. eos_token_id: default the config's; None never stops early.
    speculative: None or "mtp" (MTP drafts verified by the model: greedy output is identical to plain greedy,
    sampled output has the model's distribution). max_batch: cache slots (default: all prompts at once; more
    prompts than slots run with continuous batching). kv_cache: the cache's storage, e.g.
    `KVCacheConfig(bits=8)` (int8) or `KVCacheConfig(bits=4, hadamard=True)` (`Engine`); default the compute
    dtype. stats: filled with the engine's summary when given.
    """
    if eos_token_id is _CONFIG:
        eos_token_id = model.config.eos_token_id
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of prompts, got {type(prompts).__name__} "
                         f"{prompts if isinstance(prompts, (str, bytes)) else ''!r}")
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
    resolve_kv_cache(kv_cache, model.config.head_dim)
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sampling = [SamplingParams(temperature, top_k, top_p, seed + i) for i in range(len(prompts))]
    lengths = [len(p.input_ids) if _is_vl_prompt(p) else len(p) if isinstance(p, (list, tuple)) else 0
               for p in prompts]
    max_len = min(model.config.max_position_embeddings, _round_up(max(lengths) + max_new_tokens, 64))
    for i, p in enumerate(prompts):
        check_prompt(model, p, max_new_tokens, max_len, f"prompts[{i}]")
    engine = Engine(model, max_slots=min(max_batch or len(prompts), len(prompts)), max_len=max_len,
                    speculative=speculative, chunk=chunk, mesh=mesh, rules=rules, kv_cache=kv_cache)
    ids = [engine.submit(p, max_new_tokens=max_new_tokens, sampling=s, eos_token_id=eos_token_id,
                         stop_sequences=stop_sequences) for p, s in zip(prompts, sampling)]
    out = engine.run()
    if stats is not None:
        stats.update(engine.summary())
    return [out[i] for i in ids]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
