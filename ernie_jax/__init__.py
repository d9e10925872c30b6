"""ernie-jax: ERNIE 4.5 (dense, MoE, multimodal MoE) in JAX / Flax NNX.

    import ernie_jax
    model = ernie_jax.from_pretrained("hf_dir", dtype="float32")
    logits = model(input_ids).logits
    new_tokens = ernie_jax.generate(model, [[1, 2, 3]], max_new_tokens=16)
    ernie_jax.save_pretrained(model, "out_dir")
"""

from ernie_jax.checkpoint import CheckpointError, from_pretrained, save_pretrained
from ernie_jax.config import ConfigError, ErnieConfig, VisionConfig
from ernie_jax.inference import generate
from ernie_jax.model import CausalLMOutput, ErnieForCausalLM, abstract_model, count_params, create_model
from ernie_jax.presets import PRESETS, RELEASED, get_preset

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained", "ConfigError", "ErnieConfig", "VisionConfig", "generate", "CausalLMOutput", "ErnieForCausalLM", "abstract_model",
           "count_params", "create_model", "PRESETS", "RELEASED", "get_preset"]
__version__ = "0.1.0"
