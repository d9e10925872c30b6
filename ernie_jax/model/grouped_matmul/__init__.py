"""Grouped matmul of the dropless MoE: `out[rows of group g] = lhs[rows of group g] @ rhs[g]`, rows sorted by
group, and the routed experts' SwiGLU built on it.

Implementations (`ErnieConfig.moe_gmm_impl`; `impl.py` runs the chosen one):
- `ragged_dot`: `jax.lax.ragged_dot`, the fast path on TPU; on CPU XLA lowers it to a dense product over
  every group, so its cost grows with the number of experts.
- `tiled` (`tiled.py`): plain JAX, each group padded to whole tiles, one batched matmul over the tiles.
- `bucketed` (`bucketed.py`): plain JAX, per-group buckets of about the mean group size plus overflow tiles
  for the busier groups, the layout picked at run time; its own custom_vjp. The CPU default.
- `pallas`: the Pallas TPU kernel `pallas_kernels.gmm`.
`auto` picks `ragged_dot` on TPU and `bucketed` elsewhere. `expert_swiglu` (`swiglu.py`) runs gate, up, the
activation and the down projection; on `bucketed` fused on one layout. Measurements: docs/benchmarks.md
(MoE scaling; Grouped matmul).
"""

from ernie_jax.model.grouped_matmul.impl import grouped_matmul
from ernie_jax.model.grouped_matmul.swiglu import expert_swiglu

__all__ = ["expert_swiglu", "grouped_matmul"]
