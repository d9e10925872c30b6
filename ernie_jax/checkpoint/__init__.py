"""Checkpoints: transformers safetensors in and out (`hf`)."""

from ernie_jax.checkpoint.hf import from_pretrained, param_rules, save_pretrained
from ernie_jax.checkpoint.rules import CheckpointError

__all__ = ["CheckpointError", "from_pretrained", "param_rules", "save_pretrained"]
