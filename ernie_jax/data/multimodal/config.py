"""Multimodal data configuration: `DataConfig` plus the model's special token ids, the image budgets per row
and the processor settings.

A multimodal source is a JSONL file (or an ArrayRecord file of the same JSON objects) of records
`{"segments": [{"text": str} | {"image": base64 of encoded image bytes}, ...], "answer": str (optional)}`
(see `document.py`); `SourceConfig.kind` stays "text" and `field` is unused. Every field here except the
loader knobs is part of `fingerprint()` (inherited), so a saved state refuses to restore under other
budgets, token ids or resize settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ernie_jax.data.config import DataConfig, DataConfigError
from ernie_jax.processor import SpecialTokens

_TOKEN_FIELDS = tuple(f.name for f in dataclasses.fields(SpecialTokens))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultimodalDataConfig(DataConfig):
    special: SpecialTokens            # the model's six image / video token ids (a dict of them is accepted)
    max_patches_per_row: int = 1024   # P: ViT patches per row (`pixel_values [B, P, 3*p*p]`)
    max_images_per_row: int = 16      # N: images per row (`image_grid_thw [B, N, 3]`)
    patch_size: int = 14              # the model's ViT patch and merge sizes (`from_model_config` copies them)
    spatial_merge_size: int = 2
    min_pixels: int = 56 * 56         # smart_resize's area bounds (the processor's image defaults)
    max_pixels: int = 28 * 28 * 6177
    answer_only_loss: bool = False    # loss only on each record's `answer` (and eos)

    def __post_init__(self):
        object.__setattr__(self, "special", _special_tokens(self.special))
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
        ids = self.special.ids()
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise DataConfigError(f"the six image/video token ids of `special` must be distinct and >= 0, got "
                                  f"{dataclasses.asdict(self.special)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MultimodalDataConfig":
        """`DataConfig.from_dict`; the token ids go under "special" (a dict of the six `*_token_id`)."""
        flat = sorted(set(d) & set(_TOKEN_FIELDS))
        if flat:
            raise DataConfigError(f"data config keys {flat}: the image / video token ids go under 'special' "
                                  f"(a dict of {list(_TOKEN_FIELDS)}), or come from the model (`from_model_config`)")
        return super().from_dict(d)

    @classmethod
    def from_model_config(cls, model_config: Any, **kwargs) -> "MultimodalDataConfig":
        """The special token ids and the patch / merge sizes from an `ErnieConfig` with `vision`; `kwargs` (the
        other fields, or overrides) as for `from_dict`."""
        if getattr(model_config, "vision", None) is None:
            raise DataConfigError("the model config has no vision config: not a VL model")
        kw: dict[str, Any] = dict(special=SpecialTokens.from_config(model_config),
                                  patch_size=model_config.vision.patch_size,
                                  spatial_merge_size=model_config.vision.spatial_merge_size)
        kw.update(kwargs)
        return cls.from_dict(kw)

    def _stream_fields(self) -> dict[str, Any]:
        fields = super()._stream_fields()
        fields.update(fields.pop("special"))  # flat, as when the six ids were fields: saved states still restore
        return fields


def _special_tokens(value: Any) -> SpecialTokens:
    if isinstance(value, SpecialTokens):
        return value
    if not isinstance(value, Mapping):
        raise DataConfigError(f"special must be a SpecialTokens or a dict of {list(_TOKEN_FIELDS)}, got "
                              f"{type(value).__name__}")
    unknown, missing = sorted(set(value) - set(_TOKEN_FIELDS)), [n for n in _TOKEN_FIELDS if n not in value]
    if unknown or missing:
        raise DataConfigError(f"special: unknown keys {unknown}, missing keys {missing}; it holds exactly "
                              f"{list(_TOKEN_FIELDS)}")
    return SpecialTokens(**{n: int(value[n]) for n in _TOKEN_FIELDS})
