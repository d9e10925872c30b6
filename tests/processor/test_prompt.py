"""Prompt building vs transformers' Ernie4_5_VLMoeProcessor (tiny word-level tokenizer, PIL image processor)."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from ernie_jax.config import ErnieConfig
from ernie_jax.processor import SpecialTokens, Vision, build_inputs, collate, encode_prompt, preprocess_video, type_ids

NAMES = {"image_token_id": "<|IMAGE_PLACEHOLDER|>", "image_start_token_id": "<|IMAGE_START|>",
         "image_end_token_id": "<|IMAGE_END|>", "video_token_id": "<|VIDEO_PLACEHOLDER|>",
         "video_start_token_id": "<|VIDEO_START|>", "video_end_token_id": "<|VIDEO_END|>"}
TOK = SpecialTokens(**{k: 50 + i for i, k in enumerate(NAMES)})
IMG = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
VID = "<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"


def _img(h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _vid(t, h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (t, h, w, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_processor():
    """transformers' processor with a word-level tokenizer: word "wN" is id N, the six vision tokens are
    50..55, pad 0. Its video processor needs torchvision, so ours stands in for the pixels (the token
    expansion and type ids under test stay transformers')."""
    pytest.importorskip("torch")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import BatchFeature, PreTrainedTokenizerFast
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil)
    from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 50)},
             **{NAMES[k]: getattr(TOK, k) for k in NAMES}, "<unk>": 56}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    special = {k.removesuffix("_id"): v for k, v in NAMES.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens=special)

    class OurVideoPixels:
        merge_size, temporal_patch_size = 2, 2
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __call__(self, videos, **kwargs):
            out = [preprocess_video(v) for v in videos]
            return BatchFeature({"pixel_values_videos": np.concatenate([p for p, _ in out]),
                                 "video_grid_thw": np.stack([g for _, g in out])})

    class Processor(Ernie4_5_VLMoeProcessor):
        def check_argument_for_proper_class(self, name, arg):  # the stand-in video processor is no HF class
            return None

    return Processor(image_processor=Ernie4_5_VLMoeImageProcessorPil(), tokenizer=tokenizer,
                     video_processor=OurVideoPixels())


def _words(ids):
    return " ".join(f"w{i}" for i in ids)


def _compare(hf_processor, prompts):
    """prompts: lists of segments (lists of word ids, ("image", array) or ("video", array))."""
    texts, images, videos, ours = [], [], [], []
    for p in prompts:
        parts, segs = [], []
        for seg in p:
            if isinstance(seg, tuple) and seg[0] == "image":
                parts.append(IMG), images.append(seg[1]), segs.append(Vision.from_image(seg[1]))
            elif isinstance(seg, tuple):
                parts.append(VID), videos.append(seg[1]), segs.append(Vision.from_video(seg[1]))
            else:
                parts.append(_words(seg)), segs.append(seg)
        texts.append(" ".join(parts))
        ours.append(segs)
    want = hf_processor(text=texts, images=images or None, videos=videos or None, return_tensors="np", padding=True)
    got = build_inputs(ours, TOK)
    assert sorted(got) == sorted(want.keys())
    for k in got:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    return got


@pytest.mark.hf
def test_image_prompt_matches_transformers(hf_processor):
    got = _compare(hf_processor, [[[1, 2], ("image", _img(100, 150, 0)), [3, 4, 5]]])
    assert got["image_grid_thw"].tolist() == [[1, 8, 10]] and got["input_ids"].shape == (1, 2 + 22 + 3)


@pytest.mark.hf
def test_padded_batch_with_images_matches_transformers(hf_processor):
    got = _compare(hf_processor, [[[1], ("image", _img(60, 90, 1)), [2, 3], ("image", _img(40, 30, 2))],
                                  [[7, 8, 9, 10], ("image", _img(300, 100, 3))],
                                  [[11, 12]]])
    spans = got["image_grid_thw"].prod(1) // 4 + 2  # start + placeholders + end
    assert got["attention_mask"].sum(1).tolist() == [3 + spans[0] + spans[1], 4 + spans[2], 2]


@pytest.mark.hf
def test_video_and_mixed_prompts_match_transformers(hf_processor):
    got = _compare(hf_processor, [[[1], ("video", _vid(3, 40, 50, 4)), [2], ("image", _img(56, 56, 5)), [3]],
                                  [("image", _img(80, 20, 6)), [4, 5], ("video", _vid(2, 30, 30, 7))]])
    assert got["video_grid_thw"][:, 0].tolist() == [4, 2]
    vid = got["input_ids"] == TOK.video_token_id
    assert vid.sum() == got["video_grid_thw"].prod(1).sum() // 8


def test_type_ids_and_layout():
    v = Vision("video", np.zeros((4 * 4 * 6, 588), np.float32), np.array([4, 4, 6]))
    i = Vision("image", np.zeros((2 * 4, 588), np.float32), np.array([1, 2, 4]))
    enc = encode_prompt([[7, 8], i, np.array([9]), v, []], TOK)
    ids = [7, 8, 51] + [50] * 2 + [52, 9, 54] + [53] * 12 + [55]
    assert enc.input_ids.tolist() == ids
    assert enc.mm_token_type_ids.tolist() == [0, 0, 0, 1, 1, 0, 0, 0] + [2] * 12 + [0]
    assert enc.moe_mm_token_type_ids.tolist() == [0, 0, 1, 1, 1, 1, 0, 2] + [2] * 12 + [2]
    mm, moe = type_ids(np.array([ids]), TOK)
    np.testing.assert_array_equal(mm[0], enc.mm_token_type_ids)
    np.testing.assert_array_equal(moe[0], enc.moe_mm_token_type_ids)
    batch = collate([enc, encode_prompt([[1]], TOK)], pad_token_id=3, pad_to=24)
    assert batch["input_ids"][1].tolist() == [1] + [3] * 23 and batch["attention_mask"][1].sum() == 1
    assert batch["mm_token_type_ids"][1].sum() == 0 and "pixel_values" in batch and "video_grid_thw" in batch
    assert "pixel_values" not in collate([encode_prompt([[1]], TOK)])


def test_raw_images_and_config_tokens():
    img = _img(60, 90, 1)
    a = encode_prompt([[1], img], TOK)
    b = encode_prompt([[1], Image.fromarray(img)], TOK)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.images[0].patches, b.images[0].patches)
    cfg = ErnieConfig()
    assert dataclasses.asdict(SpecialTokens.from_config(cfg)) == {k: getattr(cfg, k) for k in NAMES}


def test_bad_prompts_raise():
    with pytest.raises(ValueError, match="segment 1: text token 1 is the image/video token id 50"):
        encode_prompt([[1], [2, 50]], TOK)
    with pytest.raises(TypeError, match="segment 0: text must be a 1-D sequence"):
        encode_prompt([np.zeros((2, 2), np.int64)], TOK)
    with pytest.raises(ValueError, match=r"segment 0 \(image\): patches must be \[T\*gh\*gw=8"):
        encode_prompt([Vision("image", np.zeros((7, 588)), np.array([1, 2, 4]))], TOK)
    with pytest.raises(ValueError, match="not divisible by merge_size=2"):
        encode_prompt([Vision("image", np.zeros((6, 588)), np.array([1, 2, 3]))], TOK)
    with pytest.raises(ValueError, match="frame count T=3 is not divisible"):
        encode_prompt([Vision("video", np.zeros((12, 588)), np.array([3, 2, 2]))], TOK)
    with pytest.raises(ValueError, match="an image has grid T=1"):
        encode_prompt([Vision("image", np.zeros((8, 588)), np.array([2, 2, 2]))], TOK)
    with pytest.raises(ValueError, match="pad_to=2 is shorter than the longest prompt"):
        collate([encode_prompt([[1, 2, 3]], TOK)], pad_to=2)
