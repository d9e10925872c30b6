"""Image / video preprocessing vs transformers' ERNIE-4.5-VL image (PIL backend) and video processors."""

import numpy as np
import pytest
from PIL import Image

from ernie_jax.processor.image import (CLIP_STD, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, preprocess_image,
                                       preprocess_video, smart_resize, to_rgb)

SIZES = [(100, 150), (28, 28), (17, 500), (333, 41), (20, 30), (300, 400)]


def _random_image(h, w, c=3, seed=0):
    rng = np.random.RandomState(seed)
    # smooth gradients plus noise: both the ringing and the flat parts of bicubic resampling matter
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 // max(h - 1, 1) + xx * 255 // max(w - 1, 1))[..., None] // 2
    return np.clip(base + rng.randint(-40, 40, (h, w, c)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_image_processor():
    pytest.importorskip("transformers")  # the PIL backend itself needs no torch
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil)
    return Ernie4_5_VLMoeImageProcessorPil()


@pytest.mark.hf
def test_smart_resize_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import smart_resize as hf
    rng = np.random.RandomState(0)
    cases = [(h, w) for h, w in rng.randint(1, 4000, (300, 2)) if max(h, w) / min(h, w) <= 200]
    cases += [(1, 200), (200, 1), (28, 28), (14, 14), (56, 56), (3000, 15), (10_000, 10_000), (2201, 2201)]
    for limits in [dict(min_pixels=56 * 56, max_pixels=28 * 28 * 6177), dict(min_pixels=VIDEO_MIN_PIXELS,
                                                                              max_pixels=VIDEO_MAX_PIXELS),
                   dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)]:
        for h, w in cases:
            assert smart_resize(int(h), int(w), **limits) == hf(int(h), int(w), factor=28, **limits), (h, w, limits)


def test_smart_resize_edges_and_errors():
    assert smart_resize(28, 28) == (56, 56)  # below min_pixels: scaled up to 56 x 56
    assert smart_resize(1000, 1000, max_pixels=28 * 28 * 100) == (280, 280)  # capped at the budget
    h, w = smart_resize(1, 200)  # ratio exactly 200 is allowed
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 56 * 56
    with pytest.raises(ValueError, match=r"height=1, width=201 has aspect ratio 201\.0 > 200"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)


@pytest.mark.hf
@pytest.mark.parametrize("size", SIZES)
def test_image_matches_transformers_exactly(hf_image_processor, size):
    img = _random_image(*size, seed=size[0])
    out = hf_image_processor(img, return_tensors="np")
    patches, grid = preprocess_image(img)
    assert patches.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
    np.testing.assert_array_equal(patches, out["pixel_values"])  # same PIL kernel and float ops: bit-exact


@pytest.mark.hf
def test_image_budget_and_modes_match_transformers(hf_image_processor):
    img = _random_image(300, 400, seed=3)
    limits = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)  # forces the downscale branch
    out = hf_image_processor(img, size={"shortest_edge": limits["min_pixels"],
                                        "longest_edge": limits["max_pixels"]}, return_tensors="np")
    patches, grid = preprocess_image(img, **limits)
    np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
    np.testing.assert_array_equal(patches, out["pixel_values"])
    rgba = _random_image(60, 90, c=4, seed=4)
    rgba[..., 3] = np.linspace(0, 255, 90).astype(np.uint8)  # real transparency
    for image in (rgba, Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., 0], "L"), rgba[..., :1]):
        np.testing.assert_array_equal(preprocess_image(image)[0],
                                      hf_image_processor(image, return_tensors="np")["pixel_values"])
    # a 2-D uint8 array is grayscale, like a PIL "L" image
    np.testing.assert_array_equal(preprocess_image(rgba[..., 0])[0],
                                  preprocess_image(Image.fromarray(rgba[..., 0], "L"))[0])


def test_patches_are_window_major_and_channel_first():
    img = _random_image(56, 84, seed=5)  # no resize: 56 x 84 is already a multiple of 28
    patches, grid = preprocess_image(img, mean=(0, 0, 0), std=(1, 1, 1))
    assert grid.tolist() == [1, 4, 6]
    chw = (img.astype(np.float64) / 255).astype(np.float32).transpose(2, 0, 1)
    for k in range(4 * 6):
        window, inside = divmod(k, 4)
        wr, wc = divmod(window, 6 // 2)
        r, c = 2 * wr + inside // 2, 2 * wc + inside % 2
        np.testing.assert_array_equal(patches[k], chw[:, 14 * r:14 * r + 14, 14 * c:14 * c + 14].reshape(-1))


def test_bad_images_raise():
    with pytest.raises(TypeError, match="must be uint8"):
        preprocess_image(np.zeros((30, 30, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(30, 30, 2\)"):
        preprocess_image(np.zeros((30, 30, 2), np.uint8))
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        to_rgb([[0, 1]])
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(ValueError, match="merge_size"):
        preprocess_image(np.zeros((30, 30, 3), np.uint8), merge_size=0)


@pytest.mark.hf
def test_video_is_per_frame_image_pipeline_with_odd_frame_duplicated(hf_image_processor):
    """transformers' video layout is its image patchify per frame (same permute), frames in order; the last
    frame duplicated for an odd count. Checked against the PIL image processor at video budgets."""
    frames = np.stack([_random_image(90, 120, seed=s) for s in range(3)])
    patches, grid = preprocess_video(frames)
    size = {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}
    out = hf_image_processor(list(frames) + [frames[-1]], size=size, return_tensors="np")
    assert grid.tolist() == [4, *out["image_grid_thw"][0, 1:].tolist()]
    np.testing.assert_array_equal(patches, out["pixel_values"])
    even, grid2 = preprocess_video([Image.fromarray(f) for f in frames[:2]])  # PIL frames, even count
    assert grid2[0] == 2
    np.testing.assert_array_equal(even, patches[: len(even)])


@pytest.mark.hf
def test_video_close_to_transformers_video_processor():
    """transformers resizes video frames with torchvision (bicubic, antialiased, uint8), we with PIL: the
    kernels round some pixels to a neighbouring uint8 level. Measured on noisy frames: at most 2 levels,
    on ~1% of values; so |d| <= 2 / 255 / min(std) (+ fp32 slack), and few values differ at all."""
    pytest.importorskip("torchvision")
    from transformers.models.ernie4_5_vl_moe.video_processing_ernie4_5_vl_moe import Ernie4_5_VLMoeVideoProcessor
    vp = Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False, do_sample_frames=False)
    for t, h, w in [(3, 100, 150), (4, 240, 320), (2, 500, 300)]:
        frames = np.stack([_random_image(h, w, seed=s) for s in range(t)])
        out = vp(videos=[frames], return_tensors="np")
        patches, grid = preprocess_video(frames)
        np.testing.assert_array_equal(grid, out["video_grid_thw"][0])
        d = np.abs(patches - out["pixel_values_videos"])
        assert d.max() <= 2 / 255 / min(CLIP_STD) + 1e-5
        assert (d > 1e-5).mean() < 0.02


def test_bad_videos_raise():
    with pytest.raises(ValueError, match="one size"):
        preprocess_video([np.zeros((60, 60, 3), np.uint8), np.zeros((60, 62, 3), np.uint8)])
    with pytest.raises(ValueError, match="temporal_patch_size must be 2"):
        preprocess_video(np.zeros((2, 60, 60, 3), np.uint8), temporal_patch_size=1)
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        preprocess_video(np.zeros((60, 60, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video([])
