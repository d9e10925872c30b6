"""Grouped matmul for MoE experts, as Pallas TPU kernels (forward + backward).

    from pallas_kernels.gmm import gmm
    out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)   # [M, K] x [G, K, N] -> [M, N]

- `gmm`: differentiable (`jax.custom_vjp`: d lhs by `gmm` with the other rhs layout, d rhs by `tgmm`);
  `group_offset` (+ the local group count rhs.shape[0]) for expert parallelism; `transpose_rhs`;
  bf16 / fp32 operands, fp32 accumulation; tiles from `choose_tiling` unless given.
- `tgmm`: the per-group weight gradient lhs[:, rows]^T-style product -> [G, K, N].
- `interpret=None` picks the Mosaic kernel when lowering for TPU (AOT from a CPU host included) and the Pallas
  interpreter for any other platform (CPU tests, the MoE layer on CPU): `pallas_kernels.target`.
- Oracles in `reference` (`jax.lax.ragged_dot`, numpy loops). Kernels and schedule: `kernel`.
"""

from pallas_kernels.gmm.ops import choose_tiling, gmm, tgmm

__all__ = ["choose_tiling", "gmm", "tgmm"]
