"""Image and video pixels -> ViT patches, exactly as transformers' ERNIE-4.5-VL processors (numpy + PIL).

    smart_resize(height, width, *, factor=28, min_pixels=56*56, max_pixels=28*28*6177) -> (h, w)
    preprocess_image(image, **kw) -> (patches fp32 [gh*gw, 3*14*14], grid_thw int64 [3] = (1, gh, gw))
    preprocess_video(frames, **kw) -> (patches fp32 [T*gh*gw, 3*14*14], grid_thw int64 [3] = (T, gh, gw))

Steps (transformers `Ernie4_5_VLMoeImageProcessorPil`): convert to RGB (alpha composited onto white), resize
with PIL bicubic to `smart_resize`'s size (multiples of patch * merge = 28, area within [min, max] pixels),
rescale by 1/255 (in float64, stored fp32), normalise with the OpenAI-CLIP mean/std, then cut 14 x 14
patches in **2x2-window-major order**: windows row-major over the (gh/2, gw/2) grid, the 4 patches of a
window row-major inside it, each patch flattened channel-first `(C, 14, 14)`. The ViT's 2x2 merge then
concatenates 4 consecutive patches. Images come out bit-identical to the PIL processor.

Videos (`Ernie4_5_VLMoeVideoProcessor`): every frame goes through the same steps with the video pixel
budget (min 299*28*28, max 1196*28*28 per frame); an odd frame count duplicates the last frame, because the
adapter merges frame pairs (temporal patch size 2); `grid_thw[0]` is the (even) frame count. Two
differences from transformers, both deliberate:
* transformers draws a "time: hh:mm:ss.ss" stamp onto each frame by default (`draw_on_frames=True`, a TTF
  font shipped with the checkpoint); we never draw. Compare with transformers' `draw_on_frames=False`.
* transformers resizes video frames with torchvision (bicubic, antialiased, on uint8 tensors), we with PIL
  (the image processor's kernel). The two kernels round a few pixels to neighbouring uint8 levels, so
  video pixels agree with transformers' only to within the resize tolerance (see tests/processor).
Frame sampling is `ernie_jax.processor.frames.sample_frame_indices`; this module takes sampled frames.

Inputs: a `PIL.Image.Image` (any mode) or a uint8 array `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]`
(channels last); a video is a uint8 array `[T, H, W, C]` or a sequence of such frames, all of one size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 6177
VIDEO_MIN_PIXELS = 299 * 28 * 28
VIDEO_MAX_PIXELS = 1196 * 28 * 28
MAX_ASPECT_RATIO = 200

ImageInput = Image.Image | np.ndarray


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The (h, w) an image of `height x width` is resized to: multiples of `factor`, area in
    [min_pixels, max_pixels] (up to rounding), aspect ratio kept as well as possible (transformers' rule)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of height={height}, width={width} has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f} > {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: ImageInput) -> np.ndarray:
    """PIL image or uint8 [H, W(, C)] array -> uint8 [H, W, 3]; alpha is composited onto white (transformers)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image array must be uint8 (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last), "
                         f"got shape {image.shape}")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], PIL bicubic (transformers' PIL backend)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))


def _normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3] -> fp32 [..., 3]; same float ops and dtypes as transformers' rescale + normalize."""
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _patchify(x: np.ndarray, patch_size: int, merge_size: int) -> np.ndarray:
    """fp32 [T, H, W, C] -> [T*gh*gw, C*p*p] in 2x2-window-major order, each patch channel-first."""
    t, h, w, c = x.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    x = x.reshape(t, gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (t, gh/m, gw/m, mh, mw, c, ph, pw)
    return np.ascontiguousarray(x).reshape(t * gh * gw, c * p * p)


def _check_geometry(patch_size: int, merge_size: int) -> None:
    for name, v in (("patch_size", patch_size), ("merge_size", merge_size)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def preprocess_image(image: ImageInput, *, patch_size: int = 14, merge_size: int = 2,
                     min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches fp32 [gh*gw, 3*p*p], grid_thw int64 [3] = (1, gh, gw))."""
    _check_geometry(patch_size, merge_size)
    rgb = to_rgb(image)
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    x = _normalize(_resize(rgb, h, w), mean, std)
    patches = _patchify(x[None], patch_size, merge_size)
    return patches, np.array([1, h // patch_size, w // patch_size], np.int64)


def preprocess_video(frames: np.ndarray | Sequence[ImageInput], *, patch_size: int = 14, merge_size: int = 2,
                     temporal_patch_size: int = 2, min_pixels: int = VIDEO_MIN_PIXELS,
                     max_pixels: int = VIDEO_MAX_PIXELS, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, np.ndarray]:
    """Sampled frames (uint8 [T, H, W, C] or a sequence of images of one size) ->
    (patches fp32 [T'*gh*gw, 3*p*p], grid_thw int64 [3] = (T', gh, gw)), T' = T rounded up to even."""
    _check_geometry(patch_size, merge_size)
    if temporal_patch_size != 2:
        raise ValueError(f"ERNIE-4.5-VL merges frame pairs: temporal_patch_size must be 2, got {temporal_patch_size}")
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"a video array must be [T, H, W, C] (channels last), got shape {frames.shape}")
    rgb = [to_rgb(f) for f in frames]
    if not rgb:
        raise ValueError("video has no frames")
    sizes = {f.shape[:2] for f in rgb}
    if len(sizes) > 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
    if len(rgb) % 2:  # the adapter merges frame pairs: an odd last frame is paired with itself
        rgb.append(rgb[-1])
    h, w = smart_resize(*rgb[0].shape[:2], factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    x = _normalize(np.stack([_resize(f, h, w) for f in rgb]), mean, std)
    patches = _patchify(x, patch_size, merge_size)
    return patches, np.array([len(rgb), h // patch_size, w // patch_size], np.int64)
