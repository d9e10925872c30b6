"""Oracles for the quantized matmuls: plain JAX on the dequantized weights, at HIGHEST precision in fp32.
Same semantics as `ops.quantized_matmul` / `ops.quantized_gmm`; the kernels match them up to the order of
the fp32 sums (and, for bf16 activations, the bf16 rounding of the dequantized weight tile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.qmm.format import QuantizedTensor, dequantize

HIGHEST = jax.lax.Precision.HIGHEST


def fake_quantize_activations(x: jax.Array) -> jax.Array:
    """x [M, K] -> its per-token (row) symmetric int8 round trip in fp32: s = absmax / 127 (1 for a zero row),
    q = clip(round(x / s), -127, 127), value q * s."""
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return jnp.clip(jnp.round(x / s), -127, 127) * s


def _activations(x, activation_bits):
    if activation_bits is None:
        return x.astype(jnp.float32)
    if activation_bits != 8:
        raise ValueError(f"activation_bits must be None or 8, got {activation_bits}")
    return fake_quantize_activations(x)


def qmm_reference(x: jax.Array, qt: QuantizedTensor, *, activation_bits: int | None = None,
                  out_dtype=None) -> jax.Array:
    """x [M, K] @ dequantize(qt) [K, N] -> [M, N]; activation_bits=8 first rounds x per token to int8."""
    out = jnp.dot(_activations(x, activation_bits), dequantize(qt), precision=HIGHEST)
    return out.astype(x.dtype if out_dtype is None else out_dtype)


def dequantize_stack(qts: QuantizedTensor) -> jax.Array:
    """A QuantizedTensor with a leading group axis (codes [G, K*bits/8, N], ...) -> [G, K, N] float32."""
    return jax.vmap(dequantize)(qts)


def qgmm_reference(lhs: jax.Array, qts: QuantizedTensor, group_sizes: jax.Array, *,
                   activation_bits: int | None = None, out_dtype=None) -> jax.Array:
    """ragged_dot(lhs [M, K], dequantized stack [G, K, N], group_sizes [G]) -> [M, N]; rows past
    sum(group_sizes) are zero. activation_bits=8 first rounds lhs per token to int8."""
    out = jax.lax.ragged_dot(_activations(lhs, activation_bits), dequantize_stack(qts),
                             jnp.asarray(group_sizes, jnp.int32), precision=HIGHEST,
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype if out_dtype is None else out_dtype)
