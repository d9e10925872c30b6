"""The ViT: patch layout of packed items, 2D rotate-half RoPE, packing = separate runs, padding ignored,
traced grids under jit, FlashMask = XLA (values and gradients), and parity with transformers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import VisionConfig
from ernie_jax.model.vision import VisionEncoder, patch_layout
from ernie_jax.model.vision_rope import apply_rotate_half_rope, vision_rope_angles

VCFG = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2)  # head_dim 16
D_IN = VCFG.in_channels * VCFG.patch_size ** 2
M = VCFG.spatial_merge_size
P, N_ITEMS = 40, 3  # one padded shape for every case: a single compiled program serves all grids


def _randomise(module, seed, std=0.3):
    """Random values everywhere (LayerNorm scales ~1), so that a swapped axis cannot hide."""
    r = np.random.RandomState(seed)
    g, st = nnx.split(module)
    flat = [(path, v.replace(jnp.asarray((1.0 if path[-1] == "scale" else 0.0) + std * r.randn(
        *v.get_value().shape), v.get_value().dtype))) for path, v in nnx.to_flat_state(st)]
    return nnx.merge(g, nnx.from_flat_state(flat))


@functools.cache
def _encoder(impl="xla", seed=0):
    return _randomise(VisionEncoder(VCFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0), attention_impl=impl), seed)


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, pixel_values, grid):
    return nnx.merge(graphdef, state)(pixel_values, grid)


def _call(model, pixel_values, grid):
    """The model under jit with the grid traced."""
    g, st = nnx.split(model)
    return np.asarray(_run(g, st, jnp.asarray(pixel_values), jnp.asarray(grid, jnp.int32)))


def _pixels(n, seed=1):
    return np.random.RandomState(seed).randn(n, D_IN).astype(np.float32)


def _pad(pixels, grid, p=P, n=N_ITEMS, seed=9):
    """Padding patches of garbage after the items and all-zero grid rows."""
    garbage = 5 * np.random.RandomState(seed).randn(p - len(pixels), D_IN).astype(np.float32)
    return np.concatenate([pixels, garbage]), np.concatenate([grid, np.zeros((n - len(grid), 3), int)])


def _np_layout(grid, p, m):
    """Oracle: transformers' get_vision_position_ids / get_vision_cu_seqlens per item, then padding."""
    seg, coords, frame = [], [], 0
    for t, h, w in grid:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh, ww = (a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for a in (hh, ww))
        for _ in range(t):
            seg += [frame] * (h * w)
            coords += list(zip(hh, ww))
            frame += 1
    n_pad = p - len(seg)
    return np.array(seg + [-1] * n_pad), np.array(coords + [(0, 0)] * n_pad).reshape(p, 2)


def test_patch_layout_follows_window_major_order_per_frame():
    grid = np.array([[[1, 4, 6], [0, 0, 0], [2, 2, 4]], [[3, 2, 2], [1, 2, 2], [0, 0, 0]]])
    lay = jax.jit(patch_layout, static_argnums=(1, 2))(jnp.asarray(grid), P, M)  # traced grid
    for b in range(2):
        seg, coords = _np_layout(grid[b], P, M)
        np.testing.assert_array_equal(np.asarray(lay.segment_ids[b]), seg)
        np.testing.assert_array_equal(np.asarray(lay.coords[b]), coords)
        np.testing.assert_array_equal(np.asarray(lay.valid[b]), seg >= 0)


def test_rotate_half_rope_depends_only_on_relative_position():
    r = np.random.RandomState(0)
    q, k = (jnp.asarray(r.randn(1, 1, 1, 16), jnp.float32) for _ in range(2))

    def score(pq, pk):
        aq, ak = (vision_rope_angles(jnp.asarray([[p]]), 16, 10000.0) for p in (pq, pk))
        return float(jnp.sum(apply_rotate_half_rope(q, aq) * apply_rotate_half_rope(k, ak)))

    assert score((3, 5), (1, 2)) == pytest.approx(score((7, 9), (5, 6)), abs=1e-5)  # same (dh, dw)
    assert abs(score((3, 5), (1, 2)) - score((3, 5), (2, 1))) > 1e-3  # rows and columns are told apart
    assert float(jnp.linalg.norm(apply_rotate_half_rope(q, vision_rope_angles(jnp.asarray([[[4, 1]]]), 16,
                                                                               10000.0)))) == pytest.approx(
        float(jnp.linalg.norm(q)), rel=1e-6)


def test_packed_items_equal_separate_runs_and_padding_is_ignored():
    model = _encoder("xla")
    a, b = _pixels(24, seed=1), _pixels(8, seed=2)  # an image 4x6 and a two-frame video 2x2
    ga, gb = np.array([[1, 4, 6]]), np.array([[2, 2, 2]])
    alone_a, alone_b = _call(model, *_pad(a, ga))[:24], _call(model, *_pad(b, gb, seed=4))[:8]
    packed = _call(model, *_pad(np.concatenate([a, b]), np.concatenate([ga, gb])))
    np.testing.assert_allclose(packed[:24], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[24:32], alone_b, atol=1e-5)
    # the batched layout: row b holds its own items from patch 0
    rows = [_pad(a, ga), _pad(b, gb, seed=3)]
    batched = _call(model, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    assert batched.shape == (2, P, VCFG.hidden_size)
    np.testing.assert_allclose(batched[0, :24], alone_a, atol=1e-5)
    np.testing.assert_allclose(batched[1, :8], alone_b, atol=1e-5)
    assert np.isfinite(batched).all()


def _packed_case():
    """Two items and padding (patches and a zero grid row), and a cotangent that is zero on padding."""
    pixels, grid = _pad(np.concatenate([_pixels(24), _pixels(8, seed=4)]), np.array([[1, 4, 6], [2, 2, 2]]))
    valid = np.arange(P) < 32
    cot = jnp.asarray(np.random.RandomState(5).randn(P, VCFG.hidden_size) * valid[:, None], jnp.float32)
    return jnp.asarray(pixels), jnp.asarray(grid), valid, cot


@functools.cache
def _value_and_grads(impl):
    pixels, grid, valid, cot = _packed_case()
    g, st = nnx.split(_encoder(impl))

    @jax.jit
    def f(st, pv, grid):
        out = nnx.merge(g, st)(pv, grid)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(f, has_aux=True)(st, pixels, grid)
    return np.asarray(out)[valid], [np.asarray(x) for x in jax.tree.leaves(grads)]


def test_flashmask_matches_xla_forward():
    """Block-diagonal, non-causal mask with padding keys and queries through the FlashMask kernel (the
    Pallas interpreter on CPU): the XLA oracle's outputs."""
    pixels, grid, valid, _ = _packed_case()
    out = {impl: _call(_encoder(impl), pixels, grid)[valid] for impl in ("xla", "flashmask")}
    np.testing.assert_allclose(out["flashmask"], out["xla"], atol=1e-5)


def test_gradients_are_finite_and_reach_every_parameter():
    _, grads = _value_and_grads("xla")
    for gx in grads:
        assert np.isfinite(gx).all() and np.abs(gx).max() > 0


def test_flashmask_matches_xla_gradients():
    out_x, grads_x = _value_and_grads("xla")
    out_f, grads_f = _value_and_grads("flashmask")
    np.testing.assert_allclose(out_f, out_x, atol=1e-5)
    for gf, gx in zip(grads_f, grads_x):
        np.testing.assert_allclose(gf, gx, rtol=1e-4, atol=1e-4 * np.abs(gx).max())


def test_batched_layout_sharded_over_the_batch_equals_unsharded():
    """Rows split over data x fsdp, parameters over fsdp / tensor by the ViT's logical names."""
    from ernie_jax.sharding import RULE_PRESETS, MeshConfig, activate, make_mesh, param_shardings

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = {**RULE_PRESETS["fsdp_tensor"], "vit_embed": "fsdp", "vit_heads": "tensor", "vit_mlp": "tensor"}
    rows = [_pad(np.concatenate([_pixels(24, seed=b), _pixels(8, seed=10 + b)]), np.array([[1, 4, 6], [2, 2, 2]]),
                 seed=b) for b in range(2)] + [_pad(_pixels(16, seed=b), np.array([[1, 4, 4]]), seed=b) for b in (3, 4)]
    pixels, grid = jnp.asarray(np.stack([r[0] for r in rows])), jnp.asarray(np.stack([r[1] for r in rows]))
    model = _encoder("xla")
    g, st = nnx.split(model)
    with activate(mesh, rules):
        out = _run(g, jax.device_put(st, param_shardings(st, mesh, rules)),
                   jax.device_put(pixels, jax.NamedSharding(mesh, jax.P(("data", "fsdp")))), grid)
    assert out.sharding.spec[0] == ("data", "fsdp")
    for b in range(4):  # against each row alone, unsharded (the flat program of the other tests)
        np.testing.assert_allclose(np.asarray(out[b]), _call(model, pixels[b], grid[b]), atol=1e-5)


def test_bad_inputs_raise_naming_the_cause():
    model = VisionEncoder(VCFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 12\]"):
        model(jnp.zeros((8, 7)), np.array([[1, 2, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw\[0, 1\] = \[1, 3, 2\]: h and w must be multiples"):
        model(jnp.zeros((16, D_IN)), np.array([[1, 2, 4], [1, 3, 2]]))
    with pytest.raises(ValueError, match=r"describes 24 patches but the row holds 16"):
        model(jnp.zeros((16, D_IN)), np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"pixel_values \(2, 16, 12\) and grid_thw \(1, 3\) do not match"):
        model(jnp.zeros((2, 16, D_IN)), np.array([[1, 2, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw must be \[B, n >= 1, 3\]"):
        model(jnp.zeros((16, D_IN)), np.zeros((0, 3), int))
    with pytest.raises(ValueError, match="head_dim = hidden_size / num_heads = 6 must be a multiple of 4"):
        VisionEncoder(VisionConfig(depth=1, hidden_size=12, num_heads=2), param_dtype=jnp.float32, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf_vision():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeVisionConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVisionTransformerPretrainedModel)

    from ernie_jax.checkpoint.hf_vision import vision_rules
    from ernie_jax.checkpoint.rules import load_tensors

    cfg = Ernie4_5_VLMoeVisionConfig(depth=VCFG.depth, hidden_size=VCFG.hidden_size, num_heads=VCFG.num_heads,
                                     intermediate_size=VCFG.intermediate_size, patch_size=VCFG.patch_size,
                                     hidden_act="quick_gelu", spatial_merge_size=M, temporal_merge_size=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Ernie4_5_VLMoeVisionTransformerPretrainedModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # the only 1-D weights are LayerNorm scales: ~1
            p.copy_(float(p.ndim == 1 and name.endswith("weight")) + 0.3 * torch.randn(p.shape))
    tensors = {f"model.vision_tower.{k}": v.numpy() for k, v in hf.state_dict().items()}
    abstract = nnx.eval_shape(lambda: VisionEncoder(VCFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return torch, hf, load_tensors(abstract, vision_rules(VCFG, (), layout="memory"), tensors)


GRIDS = {"image": [[1, 4, 6]], "video_t4": [[4, 2, 4]], "two_images": [[1, 4, 6], [1, 2, 2]]}


@pytest.mark.hf
@pytest.mark.parametrize("case", GRIDS)
def test_matches_transformers(hf_vision, case):
    """fp32, eager attention: ours under jit with a traced, zero-padded grid and padding patches."""
    torch, hf, ours = hf_vision
    grid = np.array(GRIDS[case])
    pixels = _pixels(int(grid.prod(-1).sum()), seed=7)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), torch.tensor(grid)).last_hidden_state.numpy()
    out = _call(ours, *_pad(pixels, grid))
    assert np.abs(out[:len(ref)] - ref).max() <= 1e-5
