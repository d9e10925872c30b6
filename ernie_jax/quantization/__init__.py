"""Quantization schemes: how weights, activations or the KV cache are stored in fewer bits and read back.

One concept per module; import the submodules:
- `scheme`: which decoder weights get which integer layout (`QuantScheme`, `WeightRule`, presets `get_scheme`);
- `model`: `quantize_model` (round to nearest or GPTQ) and the bytes it saves;
- `quantized_weight`: `QuantizedWeight`, the codes + scales a quantized model's projections hold;
- `checkpoint`: `save_quantized` / `load_quantized` (loads without a full-precision copy);
- `calibration` and `gptq`: calibration activations, their Hessians, and GPTQ;
- `kv_cache` and `hadamard`: the inference engine's int8 / int4 KV cache and its randomised rotation.
The package re-exports only the user-facing cache option.
"""

from ernie_jax.quantization.kv_cache import KVCacheConfig

__all__ = ["KVCacheConfig"]
