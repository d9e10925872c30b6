"""Post-training reward system: verifiers (exact answer, checklist, code sandbox), a reference-based judge
model (RLLM), a discriminative reward model (RDRM), and `RewardSystem`, which combines sources with per-source
normalisation."""

from ernie_jax.reward.sandbox import SandboxResult, run_python

__all__ = ["SandboxResult", "run_python"]
