"""Multimodal data configuration: `DataConfig` plus the image budgets per row and the processor settings.

A multimodal source is a JSONL file (or an ArrayRecord file of the same JSON objects) of records
`{"segments": [{"text": str} | {"image": base64 of encoded image bytes}, ...], "answer": str (optional)}`
(see `ernie_jax.data.synthetic_vqa` for the full format); `SourceConfig.kind` stays "text" and `field` is
unused. Every field here except the loader knobs is part of `fingerprint()` (inherited), so a saved state
refuses to restore under other budgets, token ids or resize settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ernie_jax.data.config import DataConfig, DataConfigError
from ernie_jax.processor.prompt import SpecialTokens

_TOKEN_FIELDS = tuple(f.name for f in dataclasses.fields(SpecialTokens))  # one list of the six ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultimodalDataConfig(DataConfig):
    # the model's special ids (ErnieConfig fields of the same names; `from_model_config` copies them)
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int
    video_start_token_id: int
    video_end_token_id: int
    max_patches_per_row: int = 1024   # P: ViT patches per row (`pixel_values [B, P, 3*p*p]`)
    max_images_per_row: int = 16      # N: images per row (`image_grid_thw [B, N, 3]`)
    patch_size: int = 14
    spatial_merge_size: int = 2
    min_pixels: int = 56 * 56         # smart_resize's area bounds (the processor's image defaults)
    max_pixels: int = 28 * 28 * 6177
    answer_only_loss: bool = False    # loss only on each record's `answer` (and eos)

    def __post_init__(self):
        super().__post_init__()
        if not self.tokenizer:
            raise DataConfigError("multimodal records hold text: set `tokenizer` (a sentencepiece .model path)")
        for s in self.sources:
            if s.kind != "text" or s.field is not None:
                raise DataConfigError(f"source {s.path}: a multimodal source is JSON records of segments; leave "
                                      f"kind='text' and field unset (got kind={s.kind!r}, field={s.field!r})")
        for name in ("max_patches_per_row", "max_images_per_row", "patch_size", "spatial_merge_size", "min_pixels",
                     "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise DataConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise DataConfigError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        ids = [getattr(self, n) for n in _TOKEN_FIELDS]
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise DataConfigError(f"the six image/video token ids must be distinct and >= 0, got "
                                  f"{dict(zip(_TOKEN_FIELDS, ids))}")

    @classmethod
    def from_model_config(cls, model_config: Any, **kwargs) -> "MultimodalDataConfig":
        """The token ids and the patch / merge sizes from an `ErnieConfig` with `vision`; `kwargs` the rest."""
        if getattr(model_config, "vision", None) is None:
            raise DataConfigError("the model config has no vision config: not a VL model")
        kw: dict[str, Any] = {n: getattr(model_config, n) for n in _TOKEN_FIELDS}
        kw.update(patch_size=model_config.vision.patch_size, spatial_merge_size=model_config.vision.spatial_merge_size)
        kw.update(kwargs)
        return cls(**kw)
