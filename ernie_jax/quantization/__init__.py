"""Quantization schemes: how weights, activations or the KV cache are stored in fewer bits and read back.

One scheme per module (`kv_cache`: the inference engine's int8 / int4 KV cache; `hadamard`: the randomised
rotation that spreads outlier channels before quantizing); import the submodules. The package re-exports only
the user-facing cache option.
"""

from ernie_jax.quantization.kv_cache import KVCacheConfig

__all__ = ["KVCacheConfig"]
