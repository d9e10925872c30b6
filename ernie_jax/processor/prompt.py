"""Interleaved text / images / videos -> the VL model's named inputs (transformers' processor layout).

    tokens = SpecialTokens.from_config(config)               # the six vision token ids of an ErnieConfig
    enc = encode_prompt([ids_a, Vision.from_image(img), ids_b, Vision.from_video(frames)], tokens)
    batch = collate([enc, ...], pad_token_id=0)              # or build_inputs([[segments], ...], tokens)

A segment is text token ids (a sequence of ints or a 1-D integer array), a `Vision` (preprocessed image or
video), or, for convenience, an image as accepted by `preprocess_image` (a PIL image or a uint8
`[H, W(, C)]` array) with the default image settings. Text may not contain the six vision token ids. Each image becomes
`image_start + image_token x T*gh*gw/merge^2 + image_end`, each video
`video_start + video_token x T*gh*gw/(merge^2 * temporal_merge) + video_end`.

`collate` returns numpy arrays named and laid out as transformers' `Ernie4_5_VLMoeProcessor(...,
return_tensors="np", padding=True)` output, so either can be fed to the model:
* `input_ids` int64 [B, S], right-padded with `pad_token_id`; `attention_mask` int64 [B, S] (1 = token);
* `mm_token_type_ids` int64 [B, S]: 1 on image placeholders, 2 on video placeholders, else 0 (positions);
* `moe_mm_token_type_ids` int64 [B, S]: the same, and also 1 / 2 on the image / video start and end
  tokens (expert routing: start/end tokens go to the vision experts);
* `pixel_values` fp32 [sum gh*gw, 3*14*14] and `image_grid_thw` int64 [Ni, 3], present iff some prompt
  has an image; `pixel_values_videos` / `video_grid_thw` likewise for videos. Items are concatenated in
  order of appearance, prompt by prompt (the order `rope_index` and the model consume them in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, NamedTuple, Union

import numpy as np
from PIL import Image

from ernie_jax.processor.image import preprocess_image, preprocess_video


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """The token ids around and inside image / video spans (`ErnieConfig`'s fields of the same names)."""

    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int
    video_start_token_id: int
    video_end_token_id: int

    @classmethod
    def from_config(cls, config) -> SpecialTokens:
        """From an `ErnieConfig` (or anything with the six `*_token_id` attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def ids(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class Vision:
    """A preprocessed image or video: patches fp32 [T*gh*gw, C*p*p], grid_thw int64 [3] = (T, gh, gw)."""

    kind: Literal["image", "video"]
    patches: np.ndarray
    grid_thw: np.ndarray

    @classmethod
    def from_image(cls, image, **kwargs) -> Vision:
        """`preprocess_image(image, **kwargs)` as a segment."""
        return cls("image", *preprocess_image(image, **kwargs))

    @classmethod
    def from_video(cls, frames, **kwargs) -> Vision:
        """`preprocess_video(frames, **kwargs)` as a segment (frames already sampled)."""
        return cls("video", *preprocess_video(frames, **kwargs))


Segment = Union[Sequence[int], np.ndarray, Vision, Image.Image]


class EncodedPrompt(NamedTuple):
    """One prompt, unpadded: int64 [S] token ids and type ids, and its images and videos in order."""

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    moe_mm_token_type_ids: np.ndarray
    images: tuple[Vision, ...]
    videos: tuple[Vision, ...]


def _num_placeholders(v: Vision, where: str, merge_size: int, temporal_merge_size: int) -> int:
    grid = np.asarray(v.grid_thw)
    if v.kind not in ("image", "video"):
        raise ValueError(f"{where}: kind must be 'image' or 'video', got {v.kind!r}")
    if grid.shape != (3,) or (grid <= 0).any():
        raise ValueError(f"{where}: grid_thw must be 3 positive ints (T, gh, gw), got {grid.tolist()}")
    t, gh, gw = (int(x) for x in grid)
    if v.patches.ndim != 2 or v.patches.shape[0] != t * gh * gw:
        raise ValueError(f"{where}: patches must be [T*gh*gw={t * gh * gw}, C*p*p], got shape {v.patches.shape}")
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"{where}: grid (gh, gw)=({gh}, {gw}) is not divisible by merge_size={merge_size}")
    if v.kind == "image":
        if t != 1:
            raise ValueError(f"{where}: an image has grid T=1, got {t}")
        return gh * gw // merge_size**2
    if t % temporal_merge_size:
        raise ValueError(f"{where}: video frame count T={t} is not divisible by "
                         f"temporal_merge_size={temporal_merge_size}")
    return t * gh * gw // (merge_size**2 * temporal_merge_size)


def _text_ids(seg, where: str, tokens: SpecialTokens) -> np.ndarray:
    ids = np.asarray(seg)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"{where}: text must be a 1-D sequence of token ids, got {type(seg).__name__} "
                        f"with shape {ids.shape} and dtype {ids.dtype}")
    bad = np.isin(ids, tokens.ids())
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: text token {i} is the image/video token id {int(ids[i])}; pass images and "
                         f"videos as Vision segments, the processor adds their start, placeholder and end tokens")
    return ids.astype(np.int64)


def type_ids(input_ids: np.ndarray, tokens: SpecialTokens) -> tuple[np.ndarray, np.ndarray]:
    """input_ids int [..., S] -> (mm_token_type_ids, moe_mm_token_type_ids) int64 [..., S] (transformers'
    `create_mm_token_type_ids` and `create_moe_mm_token_type_ids`)."""
    mm = np.zeros(np.shape(input_ids), np.int64)
    mm[input_ids == tokens.image_token_id] = 1
    mm[input_ids == tokens.video_token_id] = 2
    moe = mm.copy()
    moe[np.isin(input_ids, (tokens.image_start_token_id, tokens.image_end_token_id))] = 1
    moe[np.isin(input_ids, (tokens.video_start_token_id, tokens.video_end_token_id))] = 2
    return mm, moe


def encode_prompt(segments: Sequence[Segment], tokens: SpecialTokens, *, merge_size: int = 2,
                  temporal_merge_size: int = 2) -> EncodedPrompt:
    """Segments in order -> one unpadded prompt with expanded image / video spans."""
    pieces: list[np.ndarray] = []
    images: list[Vision] = []
    videos: list[Vision] = []
    for i, seg in enumerate(segments):
        where = f"segment {i}"
        is_pixels = isinstance(seg, np.ndarray) and seg.dtype == np.uint8 and seg.ndim in (2, 3)
        if isinstance(seg, Image.Image) or is_pixels:
            seg = Vision.from_image(seg)
        if isinstance(seg, Vision):
            n = _num_placeholders(seg, f"{where} ({seg.kind})", merge_size, temporal_merge_size)
            if seg.kind == "image":
                start, tok, end = tokens.image_start_token_id, tokens.image_token_id, tokens.image_end_token_id
                images.append(seg)
            else:
                start, tok, end = tokens.video_start_token_id, tokens.video_token_id, tokens.video_end_token_id
                videos.append(seg)
            pieces.append(np.array([start] + [tok] * n + [end], np.int64))
        else:
            pieces.append(_text_ids(seg, where, tokens))
    input_ids = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
    mm, moe = type_ids(input_ids, tokens)
    return EncodedPrompt(input_ids, mm, moe, tuple(images), tuple(videos))


def collate(prompts: Sequence[EncodedPrompt], *, pad_token_id: int = 0, pad_to: int | None = None
            ) -> dict[str, np.ndarray]:
    """Right-pads encoded prompts into one batch (to the longest, or to `pad_to`); see the module doc."""
    if not prompts:
        raise ValueError("collate needs at least one prompt")
    longest = max(len(p.input_ids) for p in prompts)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
    b = len(prompts)
    out = {"input_ids": np.full((b, length), pad_token_id, np.int64),
           "attention_mask": np.zeros((b, length), np.int64),
           "mm_token_type_ids": np.zeros((b, length), np.int64),
           "moe_mm_token_type_ids": np.zeros((b, length), np.int64)}
    for r, p in enumerate(prompts):
        n = len(p.input_ids)
        out["input_ids"][r, :n] = p.input_ids
        out["attention_mask"][r, :n] = 1
        out["mm_token_type_ids"][r, :n] = p.mm_token_type_ids
        out["moe_mm_token_type_ids"][r, :n] = p.moe_mm_token_type_ids
    images = [v for p in prompts for v in p.images]
    videos = [v for p in prompts for v in p.videos]
    if images:
        out["pixel_values"] = np.concatenate([v.patches for v in images]).astype(np.float32)
        out["image_grid_thw"] = np.stack([v.grid_thw for v in images]).astype(np.int64)
    if videos:
        out["pixel_values_videos"] = np.concatenate([v.patches for v in videos]).astype(np.float32)
        out["video_grid_thw"] = np.stack([v.grid_thw for v in videos]).astype(np.int64)
    return out


def build_inputs(prompts: Sequence[Sequence[Segment]], tokens: SpecialTokens, *, pad_token_id: int = 0,
                 pad_to: int | None = None, merge_size: int = 2, temporal_merge_size: int = 2
                 ) -> dict[str, np.ndarray]:
    """`collate` of `encode_prompt` of each prompt."""
    return collate([encode_prompt(p, tokens, merge_size=merge_size, temporal_merge_size=temporal_merge_size)
                    for p in prompts], pad_token_id=pad_token_id, pad_to=pad_to)
