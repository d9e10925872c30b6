"""`QuantizedWeight`: a projection weight held as integer codes + scales inside an `nnx.Param`.

The layers' code does not change for it: `w[...]`, `w.astype(dt)`, `w.shape` behave as on the array, and
`model.dense.dense(x, w)` / the MoE experts call its matmuls. Each matmul lowers, at lowering time
(`jax.lax.platform_dependent`), to a Pallas kernel on TPU (`pallas_kernels.qmm.quantized_matmul`, and
`quantized_gmm` for the routed experts) and to dequantize + XLA matmul elsewhere (CPU / GPU). With 8-bit
activations the XLA path rounds each token's inputs to int8 on the kernel's grid and multiplies the rounded
values, so both paths compute the same products (up to fp32 summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.qmm import format as qformat


def activation_values(x: jax.Array, activation_bits: int | None) -> jax.Array:
    """The values a W*A8 matmul multiplies: x [..., K] rounded per token to int8 (symmetric, absmax / 127, the
    grid of `pallas_kernels.qmm.quantize_activations`) and scaled back; x itself when weight-only."""
    if activation_bits is None:
        return x
    x32 = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return (jnp.clip(jnp.round(x32 / s), -127, 127) * s).astype(x.dtype)


@struct.dataclass
class QuantizedWeight:
    """A weight of per-layer shape `shape`, stored as the QuantizedTensor of its [K, N] matrix view
    (K = prod(shape[n_lead:n_lead + n_in])); `n_lead` leading axes (the experts' E) index separate matrices.
    In a scanned stack the arrays carry a leading layer axis that the scan slices off."""
    qt: qformat.QuantizedTensor
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False, default=1)
    n_lead: int = struct.field(pytree_node=False, default=0)
    activation_bits: int | None = struct.field(pytree_node=False, default=None)
    compute_dtype: str = struct.field(pytree_node=False, default="float32")

    # --- what the layers use of an array: w[...], w.astype(dt), w.shape, w.ndim, w.dtype
    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError(f"a QuantizedWeight {self.shape} supports only w[...], got index {key!r}")
        return self

    def astype(self, dtype) -> "QuantizedWeight":
        return self.replace(compute_dtype=jnp.dtype(dtype).name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def inputs(self, x: jax.Array) -> jax.Array:
        """x as this weight's matmul sees it (int8-rounded per token under W*A8)."""
        return activation_values(x, self.activation_bits)

    def dequantize(self) -> jax.Array:
        """The weight [*shape] in the compute dtype (the arrays must not carry a layer axis)."""
        if self.qt.codes.ndim - 2 != self.n_lead:
            raise ValueError(f"QuantizedWeight {self.shape}: codes {self.qt.codes.shape} carry a layer axis; "
                             f"dequantize one layer's slice")
        deq = qformat.dequantize
        for _ in range(self.n_lead):
            deq = jax.vmap(deq)
        return deq(self.qt).reshape(self.shape).astype(self.dtype)

    def take(self, ids: jax.Array) -> "QuantizedWeight":
        """The matrices ids [...] (int, indexing the first lead axis) -> a QuantizedWeight of shape
        ids.shape + shape[1:]: gathers codes and scales, not dequantized weights."""
        if not self.n_lead:
            raise ValueError(f"QuantizedWeight {self.shape}: take() needs a leading matrix axis")
        return self.replace(qt=jax.tree.map(lambda a: a[ids], self.qt), shape=ids.shape + self.shape[1:],
                            n_lead=self.n_lead - 1 + ids.ndim)

    def matmul(self, x: jax.Array, **dot_kwargs) -> jax.Array:
        """x [M, K] @ w -> [M, N] (one matrix: n_lead 0)."""
        if self.n_lead:
            raise ValueError(f"QuantizedWeight {self.shape}: matmul takes one matrix, this is a stack")
        out_dtype = jnp.dtype(dot_kwargs.get("preferred_element_type") or x.dtype)

        def kernel(x, qt):
            from pallas_kernels.qmm import quantized_matmul
            return quantized_matmul(x, qt, activation_bits=self.activation_bits, interpret=False,
                                    out_dtype=out_dtype)

        def xla(x, qt):
            w = qformat.dequantize(qt).astype(x.dtype)
            return jnp.matmul(self.inputs(x), w, **dot_kwargs).astype(out_dtype)

        return jax.lax.platform_dependent(x, self.qt, tpu=kernel, default=xla)

    def grouped_matmul(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Rows x [M, K] sorted by group, group_sizes [G] -> [M, N]: rows of group g times matrix g (n_lead 1)."""
        if self.n_lead != 1:
            raise ValueError(f"QuantizedWeight {self.shape}: grouped_matmul needs one leading group axis")

        def kernel(x, qt, sizes):
            from pallas_kernels.qmm import quantized_gmm
            return quantized_gmm(x, qt, sizes, activation_bits=self.activation_bits, interpret=False)

        def xla(x, qt, sizes):
            from ernie_jax.model.grouped_matmul import grouped_matmul
            w = jax.vmap(qformat.dequantize)(qt).astype(x.dtype)
            return grouped_matmul(self.inputs(x), w, sizes, impl="auto")

        return jax.lax.platform_dependent(x, self.qt, group_sizes.astype(jnp.int32), tpu=kernel, default=xla)
