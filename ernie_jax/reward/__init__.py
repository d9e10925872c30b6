"""Post-training reward system: verifiers (exact answer, checklist, code sandbox), a reference-based judge
model (RLLM), a discriminative reward model (RDRM), and `RewardSystem`, which combines sources with per-source
normalisation."""

from ernie_jax.reward.checklist import (Check, Checklist, ChecklistResult, contains, ends_with, matches, max_words,
                                        no_repeated_line)
from ernie_jax.reward.combine import (Outcome, RewardBatch, RewardSource, RewardSystem, exact_answer_source,
                                      extract_program, sandbox_source)
from ernie_jax.reward.judge import ReferenceJudge
from ernie_jax.reward.reward_model import RewardModel, pairwise_loss, train_reward_model
from ernie_jax.reward.sandbox import SandboxResult, run_python

__all__ = ["Check", "Checklist", "ChecklistResult", "contains", "ends_with", "matches", "max_words",
           "no_repeated_line", "Outcome", "RewardBatch", "RewardSource", "RewardSystem", "exact_answer_source",
           "extract_program", "sandbox_source", "ReferenceJudge", "RewardModel", "pairwise_loss",
           "train_reward_model", "SandboxResult", "run_python"]
