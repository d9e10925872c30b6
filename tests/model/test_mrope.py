"""3D multimodal RoPE: position ids vs transformers' get_rope_index, angles vs its rotary embedding."""

import functools
import types as pytypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model.mrope import mrope_angles, rope_index
from ernie_jax.model.rope import apply_interleaved_rope, rope_angles
from ernie_jax.processor import SpecialTokens, Vision, build_inputs

TOK = SpecialTokens(image_token_id=90, image_start_token_id=91, image_end_token_id=92, video_token_id=93,
                    video_start_token_id=94, video_end_token_id=95)


def _image(gh, gw):
    return Vision("image", np.zeros((gh * gw, 588), np.float32), np.array([1, gh, gw]))


def _video(t, gh, gw):
    return Vision("video", np.zeros((t * gh * gw, 588), np.float32), np.array([t, gh, gw]))


def _text(n, seed=0):
    return list(np.random.RandomState(seed).randint(3, 80, n))


def _batch(prompts, rows=2, length=64, grid_rows=4):
    """build_inputs padded to one shape ([rows, length], grids [grid_rows, 3]), so that one compiled
    program serves most tests; trailing all-zero grid rows are padding (transformers never reaches them)."""
    prompts = list(prompts) + [[_text(5, 9)]] * (rows - len(prompts))
    batch = build_inputs(prompts, TOK, pad_to=length)
    for k in ("image_grid_thw", "video_grid_thw"):
        g = batch.get(k, np.zeros((0, 3), np.int64))
        batch[k] = np.concatenate([g, np.zeros((grid_rows - len(g), 3), np.int64)])
    return batch


def _grids(batch):
    return batch.get("image_grid_thw"), batch.get("video_grid_thw")


def _reference(types, image_grid, video_grid, mask=None, rule="hf", sm=2, tmerge=2):
    """Loop transcription of transformers' get_rope_index, plus the baidu rule (max(pos) + 1)."""
    b, s = types.shape
    pos = np.zeros((3, b, s), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    grids = {1: iter([] if image_grid is None else image_grid), 2: iter([] if video_grid is None else video_grid)}
    for r in range(b):
        keep = np.ones(s, bool) if mask is None else mask[r].astype(bool)
        ty = types[r][keep]
        out, cur = [], 0
        i = 0
        while i < len(ty):
            e = i
            while e < len(ty) and ty[e] == ty[i]:
                e += 1
            if ty[i] == 0:
                out += [(cur + n,) * 3 for n in range(e - i)]
                cur += e - i
            else:
                t, gh, gw = next(grids[int(ty[i])])
                tm = t if ty[i] == 1 else t // tmerge
                block = [(cur + a, cur + h, cur + w)
                         for a in range(tm) for h in range(gh // sm) for w in range(gw // sm)]
                out += block
                cur = cur + max(gh, gw) // sm if rule == "hf" else max(map(max, block)) + 1
            i = e
        arr = np.array(out, np.int64).T.reshape(3, -1)
        pos[:, r, keep] = arr
        deltas[r, 0] = arr.max() + 1 - len(ty)
    return pos, deltas


def _hf_rope_index(batch):
    torch = pytest.importorskip("torch")
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeModel

    fake = pytypes.SimpleNamespace(
        config=pytypes.SimpleNamespace(vision_config=pytypes.SimpleNamespace(temporal_merge_size=2,
                                                                             spatial_merge_size=2)),
        get_vision_position_ids=functools.partial(Ernie4_5_VLMoeModel.get_vision_position_ids, None))
    t = lambda k: None if batch.get(k) is None else torch.from_numpy(batch[k])  # noqa: E731
    pos, deltas = Ernie4_5_VLMoeModel.get_rope_index(
        fake, t("input_ids"), t("mm_token_type_ids"), image_grid_thw=t("image_grid_thw"),
        video_grid_thw=t("video_grid_thw"), attention_mask=t("attention_mask"))
    return pos.numpy(), deltas.numpy()


def _ours(batch, rule="hf", **kw):
    pos, deltas = rope_index(batch["mm_token_type_ids"], *_grids(batch), batch.get("attention_mask"), rule=rule, **kw)
    return np.asarray(pos), np.asarray(deltas)


PROMPTS = {
    "image": [[_text(5), _image(6, 8), _text(3, 1)]],
    "video": [[_text(4), _video(4, 6, 4), _text(6, 1)]],
    "long_lowres_video": [[_text(2), _video(16, 4, 4), _text(5, 1)]],  # Tm=8 > max(Hm, Wm)=2
    "two_images": [[_text(3), _image(4, 4), _text(2, 1), _image(8, 4), _text(4, 2)]],
    "image_video_batch": [[_text(3), _image(4, 6), _text(2, 1), _video(2, 4, 4), _text(1, 2)],
                          [_video(6, 2, 4), _text(7, 3), _image(2, 2)]],
}


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_positions_match_transformers(name):
    batch = _batch(PROMPTS[name])
    hf_pos, hf_deltas = _hf_rope_index(batch)
    pos, deltas = _ours(batch)
    assert pos.dtype == np.int32 and pos.shape == (3, *batch["input_ids"].shape) and deltas.shape == (len(pos[0]), 1)
    np.testing.assert_array_equal(pos, hf_pos)
    np.testing.assert_array_equal(deltas, hf_deltas)
    ref = _reference(batch["mm_token_type_ids"], *_grids(batch), batch["attention_mask"])
    np.testing.assert_array_equal(pos, ref[0])


@pytest.mark.hf
def test_left_padded_batch_matches_transformers():
    batch = _batch(PROMPTS["image_video_batch"])
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids"):
        batch[k] = np.stack([np.roll(row, -int(m.sum())) for row, m in zip(batch[k], batch["attention_mask"])])
    assert batch["attention_mask"][:, 0].min() == 0  # really left-padded
    hf_pos, hf_deltas = _hf_rope_index(batch)
    pos, deltas = _ours(batch)
    np.testing.assert_array_equal(pos, hf_pos)
    np.testing.assert_array_equal(deltas, hf_deltas)


def test_baidu_rule_differs_only_after_long_lowres_video():
    batch = _batch(PROMPTS["long_lowres_video"])
    hf, _ = _ours(batch, "hf")
    baidu, deltas = _ours(batch, "baidu")
    ref, ref_deltas = _reference(batch["mm_token_type_ids"], *_grids(batch), batch["attention_mask"], rule="baidu")
    np.testing.assert_array_equal(baidu, ref)
    np.testing.assert_array_equal(deltas, ref_deltas)
    vid = batch["mm_token_type_ids"][0] == 2
    after = np.flatnonzero(vid)[-1] + 1  # the video's end token: the first text token after it
    np.testing.assert_array_equal(hf[:, 0, :after], baidu[:, 0, :after])
    assert baidu[0, 0, after] == baidu[:, 0, vid].max() + 1  # baidu: max(pos) + 1
    assert hf[0, 0, after] <= hf[0, 0, vid].max()  # hf: overlaps the video's temporal positions
    for name in ("image", "two_images", "video"):  # short videos and images: the rules agree
        b = _batch(PROMPTS[name])
        np.testing.assert_array_equal(_ours(b, "hf")[0], _ours(b, "baidu")[0])


def test_jit_with_traced_grids_and_padding_rows():
    batch = _batch(PROMPTS["image_video_batch"])
    image_grid, video_grid = _grids(batch)
    pad = np.zeros((1, 3), np.int64)
    image_grid = np.concatenate([pad, image_grid[:1], pad, image_grid[1:2]])  # zero rows anywhere are skipped
    f = jax.jit(functools.partial(rope_index, rule="hf"))
    pos, deltas = f(batch["mm_token_type_ids"], image_grid, video_grid, batch["attention_mask"])
    want, want_deltas = _ours(batch)
    np.testing.assert_array_equal(np.asarray(pos), want)
    np.testing.assert_array_equal(np.asarray(deltas), want_deltas)
    # per-row grids [B, N, 3] (the packed pipeline's layout) read row-major
    per_row = np.zeros((2, 3, 3), np.int64)
    per_row[0, 1], per_row[1, 0] = image_grid[1], image_grid[3]
    np.testing.assert_array_equal(np.asarray(f(batch["mm_token_type_ids"], per_row, video_grid,
                                               batch["attention_mask"])[0]), want)
    # new grid values, same shapes: no retrace, right answer
    other = _batch([[_text(3), _image(2, 8), _text(2, 1), _video(2, 2, 4), _text(1, 2)],
                    [_video(2, 4, 4), _text(7, 3), _image(2, 2)]])
    before = f._cache_size()
    pos2, _ = f(other["mm_token_type_ids"], *_grids(other), other["attention_mask"])
    assert f._cache_size() == before
    np.testing.assert_array_equal(np.asarray(pos2), _reference(other["mm_token_type_ids"], *_grids(other),
                                                               other["attention_mask"])[0])


def test_segments_restart_positions():
    prompts = ([_text(3), _image(4, 4), _text(2, 1)], [_text(2, 2), _video(4, 2, 4), _text(3, 3)],
               [_image(2, 2), _text(1, 4)])
    alone = [_batch([p]) for p in prompts]
    n = [int(x["attention_mask"][0].sum()) for x in alone]
    packed = np.zeros((2, 64), np.int64)
    packed[0, :sum(n)] = np.concatenate([x["mm_token_type_ids"][0, :k] for x, k in zip(alone, n)])
    seg = np.zeros((2, 64), np.int32)
    seg[0, :sum(n)] = np.repeat([1, 2, 3], n)
    seg[1, :5] = 1
    grids = [np.zeros((4, 3), np.int64), np.zeros((4, 3), np.int64)]
    for kind in (0, 1):
        rows = [g for x in alone for g in _grids(x)[kind] if g.any()]
        grids[kind][:len(rows)] = rows
    for rule in ("hf", "baidu"):
        pos = np.asarray(rope_index(packed, *grids, (seg > 0).astype(np.int32), seg, rule=rule)[0])
        want = np.concatenate([_ours(x, rule)[0][:, 0, :k] for x, k in zip(alone, n)], axis=1)
        np.testing.assert_array_equal(pos[:, 0, :sum(n)], want)
        np.testing.assert_array_equal(pos[:, 0, sum(n):], 0)
        np.testing.assert_array_equal(pos[:, 1, :5], [np.arange(5)] * 3)
    # two adjacent segments of the same type are still two runs: text restarts at 0
    pos, _ = rope_index(np.zeros((1, 5), np.int32), segment_ids=np.array([[1, 1, 2, 2, 2]]))
    np.testing.assert_array_equal(np.asarray(pos)[:, 0], [[0, 1, 0, 1, 2]] * 3)


def test_text_only_is_arange_and_deltas_zero():
    pos, deltas = rope_index(np.zeros((2, 6), np.int32), attention_mask=np.array([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(pos)[:, 0], [np.arange(6)] * 3)
    np.testing.assert_array_equal(np.asarray(pos)[:, 1], [[0, 0, 0, 1, 2, 3]] * 3)
    np.testing.assert_array_equal(np.asarray(deltas), [[0], [0]])


def test_bad_inputs_raise():
    batch = _batch(PROMPTS["two_images"])
    types = batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match=r"image run #1 \(tokens .*\) has no image_grid_thw row"):
        rope_index(types, batch["image_grid_thw"][:1])
    with pytest.raises(ValueError, match=r"image run #0 has 4 tokens but image_grid_thw\[0\]"):
        rope_index(types, batch["image_grid_thw"][[1, 0, 2, 3]])
    with pytest.raises(ValueError, match="rule must be one of"):
        rope_index(types, batch["image_grid_thw"], rule="qwen")
    with pytest.raises(ValueError, match="attention_mask shape"):
        rope_index(types, batch["image_grid_thw"], attention_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="has type 3"):
        rope_index(np.array([[0, 3]]))
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_angles(jnp.zeros((3, 1, 2), jnp.int32), 16, 1e4, (4, 2, 2))


def test_text_angles_equal_1d_rope_exactly():
    p = jnp.asarray(np.random.RandomState(0).randint(0, 100_000, (2, 9)), jnp.int32)
    got = mrope_angles(jnp.broadcast_to(p, (3, 2, 9)), 128, 500000.0, (22, 22, 20))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(rope_angles(p, 128, 500000.0)))


@pytest.mark.hf
@pytest.mark.parametrize("head_dim,section", [(128, (22, 22, 20)), (16, (3, 3, 2))])
def test_angles_and_rotation_match_transformers(head_dim, section):
    torch = pytest.importorskip("torch")
    from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeTextConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (Ernie4_5_VLMoeTextRotaryEmbedding,
                                                                              apply_rotary_pos_emb)

    cfg = Ernie4_5_VLMoeTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                    "mrope_section": list(section)})
    rotary = Ernie4_5_VLMoeTextRotaryEmbedding(cfg)
    batch = _batch(PROMPTS["image_video_batch"])
    pos, _ = _ours(batch)
    angles = np.asarray(mrope_angles(jnp.asarray(pos), head_dim, 500000.0, section))
    # transformers' own angles (before cos/sin) through its recomposition: the same fp32 products
    freqs = torch.from_numpy(pos.astype(np.int64))[..., None].float() * rotary.inv_freq
    hf_angles = rotary.recomposition_frequencies(freqs)[..., ::2].numpy()
    np.testing.assert_array_equal(angles, hf_angles)
    # and the rotated queries
    q = np.random.RandomState(0).randn(*pos.shape[1:], 2, head_dim).astype(np.float32)  # [B, S, N, D]
    cos, sin = rotary(torch.zeros(1), torch.from_numpy(pos.astype(np.int64)))
    qt = torch.from_numpy(q).transpose(1, 2)
    hf_q, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
    ours = np.asarray(apply_interleaved_rope(jnp.asarray(q), jnp.asarray(angles)))
    np.testing.assert_allclose(ours, hf_q.transpose(1, 2).numpy(), atol=1e-5, rtol=0)
