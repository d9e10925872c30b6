"""`dense(x, w)`: a projection written as one 2-D matmul.

`einsum("BSH,HI->BSI")` and `dense` compute the same dot products, but their weight gradients compile
differently on XLA:CPU: the transpose of the einsum contracts over two dims (B, S), which XLA:CPU lowers
with transposed copies of the activations and a dot its fast matmul library (YNNPACK) does not take; the
2-D form's is a plain [H, T] x [T, I] matmul, which makes the attention, MLP and LM-head projections'
backward cheaper on CPU (docs/benchmarks.md, design measurements). The reshapes only merge or split dims
whose major part carries the sharding, so they cost no communication.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, **dot_kwargs) -> jax.Array:
    """Contracts the last `n_in` axes of x with the first `n_in` axes of w:
    x [..., *K], w [*K, *N] -> [..., *N]. `dot_kwargs` go to `jnp.matmul` (e.g. preferred_element_type).
    w may be a quantized weight (`ernie_jax.quantization.quantized_weight`), which does its own matmul."""
    k = math.prod(w.shape[:n_in])
    if isinstance(w, jax.Array):
        out = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **dot_kwargs)
    else:
        out = w.matmul(x.reshape(-1, k), **dot_kwargs)
    return out.reshape(x.shape[:x.ndim - n_in] + w.shape[n_in:])
