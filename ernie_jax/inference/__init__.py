"""Inference: KV-cache prefill and decode for the dense, MoE and VL models, sampling, continuous batching
(`Engine`) and MTP speculative decoding, behind `generate`."""

from ernie_jax.inference.cache import KVCache, bytes_per_token, init_cache
from ernie_jax.inference.engine import Engine
from ernie_jax.inference.generate import generate
from ernie_jax.inference.sampling import SamplingParams
from ernie_jax.quantization.kv_cache import KVCacheConfig

__all__ = ["KVCache", "KVCacheConfig", "bytes_per_token", "init_cache", "Engine", "generate", "SamplingParams"]
