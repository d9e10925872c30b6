"""ERNIE-4.5-VL preprocessing in numpy + PIL (no torch): pixels -> patches, prompts -> model inputs.

`image`: `smart_resize`, `preprocess_image`, `preprocess_video`; `frames`: `sample_frame_indices`;
`prompt`: `SpecialTokens`, `Vision`, `encode_prompt`, `collate`, `build_inputs`. See each module.
"""

from ernie_jax.processor.frames import sample_frame_indices
from ernie_jax.processor.image import CLIP_MEAN, CLIP_STD, preprocess_image, preprocess_video, smart_resize
from ernie_jax.processor.prompt import (EncodedPrompt, SpecialTokens, Vision, build_inputs, collate, encode_prompt,
                                        type_ids)

__all__ = ["CLIP_MEAN", "CLIP_STD", "EncodedPrompt", "SpecialTokens", "Vision", "build_inputs", "collate",
           "encode_prompt", "preprocess_image", "preprocess_video", "sample_frame_indices", "smart_resize",
           "type_ids"]
