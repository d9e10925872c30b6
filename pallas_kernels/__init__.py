"""Pallas kernels for ernie-jax, TPU first: each kernel package holds the `pallas_call` (kernel.py), the
differentiable op with its tiling heuristics (ops.py) and a plain-JAX oracle (reference.py). Shared:
`target` (Mosaic kernel or Pallas interpreter, chosen when lowering) and `varying` (output types under
`jax.shard_map`)."""
