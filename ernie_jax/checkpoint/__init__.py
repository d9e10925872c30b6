"""Checkpoints: transformers safetensors in and out (`hf`)."""

from ernie_jax.checkpoint.hf import CheckpointError, from_pretrained, param_rules, save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "param_rules", "save_pretrained"]
