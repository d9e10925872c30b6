"""Inference. For now: greedy decoding by full recomputation (the KV cache arrives with its own issue)."""

from ernie_jax.inference.greedy import greedy_generate, greedy_generate_ragged

__all__ = ["greedy_generate", "greedy_generate_ragged"]
