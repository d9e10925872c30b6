"""VL parity with transformers' `Ernie4_5_VLMoeForConditionalGeneration` (fp32, eager), both load directions.

Random weights everywhere and non-zero correction biases in both pools; prompts: an image, a video, and two
images of different sizes in one row (beside a text-only row, right-padded). Checks logits, the 3D position
ids, the per-row (training) input layout, and the on-disk key layout of the VL checkpoints.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from flax import nnx

import ernie_jax
from ernie_jax import get_preset
from ernie_jax.checkpoint.safetensors_io import SafetensorsFile
from ernie_jax.model.mrope import rope_index
from ernie_jax.processor.prompt import SpecialTokens, Vision, build_inputs
from random_weights import random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

CFG = get_preset("tiny-vl-test")  # layers [dense, moe, moe]; 8+8 experts (widths 16 / 8), 1 shared; ViT 2 x 32
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
TOL = 1e-5


def _img(rs, h, w):
    return rs.randint(0, 256, (h, w, 3), dtype=np.uint8)


def _prompts():
    rs = np.random.RandomState(0)
    vid = np.stack([_img(rs, 56, 84) for _ in range(3)])  # odd frame count: the last frame is duplicated
    return {
        "image": [[[5, 6, 7], Vision.from_image(_img(rs, 56, 84)), [8, 9]]],
        "video": [[[5], Vision.from_video(vid), [10, 11, 12]]],
        # two images of different sizes in one row, a text-only row beside it (right padding)
        "two_images": [[[10], Vision.from_image(_img(rs, 84, 56)), [11, 12], Vision.from_image(_img(rs, 112, 56)),
                        [13]], [[20, 21, 22, 23]]],
    }


def _randomise_hf(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("ln.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():  # zero-initialised by transformers: selection == weighting without this
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.1 * torch.randn(m.e_score_correction_bias.shape, generator=g))


def _hf_checkpoint(tmp):
    d = {**CFG.to_hf(), "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"]}
    with open(f"{tmp}/config.json", "w") as f:
        json.dump(d, f)
    hf = transformers.Ernie4_5_VLMoeForConditionalGeneration._from_config(
        transformers.AutoConfig.from_pretrained(tmp), **HF_KW).eval()
    _randomise_hf(hf)
    hf.save_pretrained(f"{tmp}/hf")
    return hf


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("vl"))
    hf = _hf_checkpoint(tmp)
    return hf, ernie_jax.from_pretrained(f"{tmp}/hf"), tmp


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, inp):
    out = nnx.merge(graphdef, state)(**inp)
    return out.logits, out.moe_stats


def _forward(model, inp):
    """(logits, moe_stats), jitted (eager NNX runs op by op and is far slower than a compile)."""
    return _jit_forward(*nnx.split(model), {k: jnp.asarray(v) for k, v in inp.items()})


def _inputs(name):
    return build_inputs(_prompts()[name], SpecialTokens.from_config(CFG), pad_token_id=0)


def _hf_logits(hf, inp):
    with torch.no_grad():
        return hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inp.items()}).logits.numpy()


def _check(ours_logits, ref, inp):
    m = np.asarray(inp["attention_mask"]).astype(bool)
    err = np.abs(np.asarray(ours_logits) - ref)[m].max()
    assert err <= TOL, err
    return err


@pytest.mark.parametrize("name", ["image", "video", "two_images"])
def test_hf_checkpoint_loads_and_matches(hf_and_ours, name):
    hf, ours, _ = hf_and_ours
    inp = _inputs(name)
    ref = _hf_logits(hf, inp)
    _check(_forward(ours, inp)[0], ref, inp)
    # the same 3D position ids as transformers
    kw = {k: torch.from_numpy(np.asarray(inp[k])) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    grids = {k: torch.from_numpy(np.asarray(inp[k])) for k in ("image_grid_thw", "video_grid_thw") if k in inp}
    hf_pos, _ = hf.model.get_rope_index(kw["input_ids"], attention_mask=kw["attention_mask"],
                                        mm_token_type_ids=kw["mm_token_type_ids"], **grids)
    pos, _ = rope_index(inp["mm_token_type_ids"], inp.get("image_grid_thw"), inp.get("video_grid_thw"),
                        inp["attention_mask"])
    m = np.asarray(inp["attention_mask"]).astype(bool)
    np.testing.assert_array_equal(np.asarray(pos)[:, m], hf_pos.numpy()[:, m])


def test_correction_bias_changes_routing(hf_and_ours):
    """Guard: the random biases are large enough to change some selections (otherwise a swapped bias could
    not show in the logits)."""
    _, _, tmp = hf_and_ours
    ours = ernie_jax.from_pretrained(f"{tmp}/hf")  # a copy: this test changes it
    inp = _inputs("two_images")
    base = _forward(ours, inp)[1]
    router_bias = ours.decoder.stacks[1].layers.mlp.vision_router.bias
    router_bias[...] = jnp.zeros_like(router_bias[...])
    assert not np.array_equal(np.asarray(_forward(ours, inp)[1].usage), np.asarray(base.usage))


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = random_model(CFG, seed=3, std=0.1)
    biases = {}
    for stack in ours.decoder.stacks:  # non-zero and different biases in the two pools: swapped pools would show
        if stack.kind == "moe":
            for pool, router in enumerate((stack.layers.mlp.router, stack.layers.mlp.vision_router)):
                router.bias[...] = 0.1 * jax.random.normal(jax.random.key(7 + pool), router.bias[...].shape)
                biases[pool] = np.asarray(router.bias[...])
    ernie_jax.save_pretrained(ours, tmp_path / "ours")
    f = SafetensorsFile(str(tmp_path / "ours" / "model.safetensors"))
    keys = set(f.keys())
    e = CFG.moe_num_experts
    assert f.shape("model.layers.1.mlp.gate.weight") == (CFG.hidden_size, e)  # [H, E] on disk (VL layout)
    assert f.shape("model.layers.1.mlp.moe_statics.e_score_correction_bias") == (2, e)
    # HF's [2, E] row 0 = text pool, row 1 = vision pool (our stack 1 holds MoE layers 1.. in depth order)
    with safetensors.safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="np") as raw:
        for layer in range(biases[0].shape[0]):
            on_disk = raw.get_tensor(f"model.layers.{layer + 1}.mlp.moe_statics.e_score_correction_bias")
            np.testing.assert_array_equal(on_disk, np.stack([biases[0][layer], biases[1][layer]]))
    assert f"model.layers.1.mlp.experts.{2 * e - 1}.down_proj.weight" in keys
    assert f.shape(f"model.layers.1.mlp.experts.{e}.gate_proj.weight") == (CFG.moe_intermediate_size[1],
                                                                            CFG.hidden_size)
    assert any(k.startswith("model.vision_model.") for k in keys)
    hf = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(tmp_path / "ours"), **HF_KW).eval()
    for name in ("image", "two_images"):
        inp = _inputs(name)
        _check(_forward(ours, inp)[0], _hf_logits(hf, inp), inp)
    # and back: our loader reads what we wrote
    again = ernie_jax.from_pretrained(tmp_path / "ours")
    inp = _inputs("video")
    np.testing.assert_array_equal(np.asarray(_forward(again, inp)[0]), np.asarray(_forward(ours, inp)[0]))


def test_per_row_layout_equals_flat(hf_and_ours):
    """The training layout (pixel_values [B, P, D], grids [B, n, 3], padded) gives the flat layout's logits."""
    _, ours, _ = hf_and_ours
    prompts = _prompts()["two_images"]
    inp = _inputs("two_images")
    flat = _forward(ours, inp)[0]
    # row 0 holds both images, row 1 none: [2, P=40, D] with padding patches, [2, 3, 3] with padding grid rows
    visions = [[s for s in p if isinstance(s, Vision)] for p in prompts]
    p_max, n_max = 64, 3  # row 0's images have 24 + 32 patches
    pix = np.zeros((2, p_max, inp["pixel_values"].shape[-1]), np.float32)
    grid = np.zeros((2, n_max, 3), np.int64)
    for r, vs in enumerate(visions):
        off = 0
        for i, v in enumerate(vs):
            pix[r, off:off + len(v.patches)] = v.patches
            grid[r, i] = v.grid_thw
            off += len(v.patches)
    row_inp = {**{k: jnp.asarray(v) for k, v in inp.items()}, "pixel_values": jnp.asarray(pix),
               "image_grid_thw": jnp.asarray(grid)}
    per_row = _forward(ours, row_inp)[0]  # jitted: traced grids
    m = np.asarray(inp["attention_mask"]).astype(bool)
    np.testing.assert_allclose(np.asarray(per_row)[m], np.asarray(flat)[m], atol=1e-5)


def test_placeholder_count_mismatch_names_the_row():
    """Concrete inputs: placeholders and adapter tokens must agree (per row in the per-row layout)."""
    from ernie_jax.model.vl import _fill_placeholders
    x = jnp.zeros((2, 5, 4))
    is_ph = jnp.asarray([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], bool)
    feats = jnp.ones((2, 3, 4))
    _fill_placeholders(x, is_ph, feats, jnp.asarray([[1, 1, 0], [1, 0, 0]], bool), "image")  # counts agree
    with pytest.raises(ValueError, match="image placeholders and image features do not match in row 1: 1 "
                                         "placeholder tokens, 2 image tokens"):
        _fill_placeholders(x, is_ph, feats, jnp.asarray([[1, 1, 0], [1, 1, 0]], bool), "image")
    with pytest.raises(ValueError, match="in the batch: 3 placeholder tokens, 2"):
        _fill_placeholders(x, is_ph, feats[0], jnp.asarray([1, 1, 0], bool), "image")
