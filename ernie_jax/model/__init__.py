"""The ERNIE-4.5 models in Flax NNX."""

from ernie_jax.model.attention import AttentionMask, attention
from ernie_jax.model.create import abstract_model, count_params, create_model
from ernie_jax.model.lm import CausalLMOutput, ErnieForCausalLM

__all__ = ["AttentionMask", "attention", "abstract_model", "count_params", "create_model", "CausalLMOutput",
           "ErnieForCausalLM"]
