"""The adapter: the temporal pairing of packed items, packing = separate runs, padding rows, traced grids,
gradients, bad inputs, and parity with transformers' resampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import VisionConfig
from ernie_jax.model.adapter import Adapter, temporal_pairs

VCFG = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2)
H_TEXT, EPS = 64, 1e-5
M2 = VCFG.spatial_merge_size ** 2
P, N_ITEMS = 64, 3  # one padded shape for every case


@functools.cache
def _adapter(seed=0, std=0.1):
    model = Adapter(VCFG, H_TEXT, EPS, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    r = np.random.RandomState(seed)
    g, st = nnx.split(model)
    flat = [(path, v.replace(jnp.asarray((1.0 if path[-1] == "scale" else 0.0) + std * r.randn(
        *v.get_value().shape), jnp.float32))) for path, v in nnx.to_flat_state(st)]
    return nnx.merge(g, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, features, grid):
    return nnx.merge(graphdef, state)(features, grid)


def _call(model, features, grid):
    g, st = nnx.split(model)
    tokens, valid = _run(g, st, jnp.asarray(features), jnp.asarray(grid, jnp.int32))
    return np.asarray(tokens), np.asarray(valid)


def _features(n, seed=1):
    return np.random.RandomState(seed).randn(n, VCFG.hidden_size).astype(np.float32)


def _pad(features, grid, p=P, n=N_ITEMS, seed=9):
    garbage = 5 * np.random.RandomState(seed).randn(p - len(features), VCFG.hidden_size).astype(np.float32)
    return np.concatenate([features, garbage]), np.concatenate([grid, np.zeros((n - len(grid), 3), int)])


def _np_pairs(grid, m2):
    """Oracle: transformers' `_temporal_slicing` offsets (merged-token indices of both halves)."""
    first, second, offset = [], [], 0
    for t, h, w in grid:
        s = h * w // m2
        for even, odd in zip(range(0, t, 2), range(1 if t > 1 else 0, t, 2)):
            first += range(offset + even * s, offset + (even + 1) * s)
            second += range(offset + odd * s, offset + (odd + 1) * s)
        offset += t * h * w // m2
    return np.array(first, int), np.array(second, int)


def test_temporal_pairs_follow_transformers_slicing():
    grid = np.array([[[1, 4, 6], [0, 0, 0], [4, 2, 4]], [[2, 2, 2], [1, 2, 2], [0, 0, 0]]])
    first, second, valid = jax.jit(temporal_pairs, static_argnums=(1, 2))(jnp.asarray(grid), P // M2, 2)
    for b in range(2):
        f, s = _np_pairs(grid[b], M2)
        np.testing.assert_array_equal(np.asarray(valid[b]), np.arange(P // M2) < len(f))
        np.testing.assert_array_equal(np.asarray(first[b])[:len(f)], f)
        np.testing.assert_array_equal(np.asarray(second[b])[:len(s)], s)


def test_packed_items_equal_separate_runs_and_padding_rows_are_zero():
    model = _adapter()
    a, b = _features(24, seed=1), _features(32, seed=2)  # an image 4x6 (6 tokens), a video 4x2x4 (4 tokens)
    ga, gb = np.array([[1, 4, 6]]), np.array([[4, 2, 4]])
    ta, va = _call(model, *_pad(a, ga))
    tb, vb = _call(model, *_pad(b, gb))
    assert va.sum() == 6 and vb.sum() == 4 and va[:6].all() and vb[:4].all()
    tokens, valid = _call(model, *_pad(np.concatenate([a, b]), np.concatenate([ga, gb])))
    np.testing.assert_array_equal(valid, np.arange(P // M2) < 10)
    np.testing.assert_allclose(tokens[:6], ta[:6], atol=1e-5)
    np.testing.assert_allclose(tokens[6:10], tb[:4], atol=1e-5)
    assert (tokens[10:] == 0).all()
    # the batched layout gives the same rows
    rows = [_pad(a, ga), _pad(b, gb, seed=3)]
    bt, bv = _call(model, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    assert bt.shape == (2, P // M2, H_TEXT) and bv.shape == (2, P // M2)
    np.testing.assert_allclose(bt[0, :6], ta[:6], atol=1e-5)
    np.testing.assert_allclose(bt[1, :4], tb[:4], atol=1e-5)


def test_gradients_are_finite_and_reach_every_parameter():
    model = _adapter()
    g, st = nnx.split(model)
    feats, grid = _pad(np.concatenate([_features(24), _features(16, seed=3)]), np.array([[1, 4, 6], [2, 2, 4]]))

    @jax.jit
    @jax.grad
    def grads(st):
        tokens, _ = nnx.merge(g, st)(jnp.asarray(feats), jnp.asarray(grid))
        return jnp.sum(jnp.sin(tokens))

    for leaf in jax.tree.leaves(grads(st)):
        assert np.isfinite(np.asarray(leaf)).all() and float(jnp.abs(leaf).max()) > 0


def test_bad_inputs_raise_naming_the_cause():
    model = Adapter(VCFG, H_TEXT, EPS, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"grid_thw\[0, 0\] = \[3, 2, 2\]: a video needs an even number"):
        model(jnp.zeros((12, VCFG.hidden_size)), np.array([[3, 2, 2]]))
    with pytest.raises(ValueError, match=r"multiples of 4"):
        model(jnp.zeros((10, VCFG.hidden_size)), np.array([[1, 2, 4]]))
    with pytest.raises(ValueError, match="temporal_merge_size = 3"):
        Adapter(VisionConfig(temporal_merge_size=3), H_TEXT, EPS, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf_resampler():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeVariableResolutionResamplerModel)

    from ernie_jax.checkpoint.hf_vision import adapter_rules
    from ernie_jax.checkpoint.rules import load_tensors

    cfg = Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=H_TEXT, rms_norm_eps=EPS, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [6, 6, 4]}),
        vision_config=dict(depth=VCFG.depth, hidden_size=VCFG.hidden_size, num_heads=VCFG.num_heads,
                           intermediate_size=VCFG.intermediate_size, spatial_merge_size=2, temporal_merge_size=2))
    torch.manual_seed(0)
    hf = Ernie4_5_VLMoeVariableResolutionResamplerModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # 1-D weights are LayerNorm / RMSNorm scales: ~1
            p.copy_(float(p.ndim == 1 and name.endswith("weight")) + 0.1 * torch.randn(p.shape))
    tensors = {f"model.resampler_model.{k}": v.numpy() for k, v in hf.state_dict().items()}
    abstract = nnx.eval_shape(lambda: Adapter(VCFG, H_TEXT, EPS, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return torch, hf, load_tensors(abstract, adapter_rules((), layout="memory"), tensors)


GRIDS = {"image": [[1, 4, 6]], "video_t4": [[4, 2, 4]], "two_images": [[1, 4, 6], [1, 2, 2]],
         "image_and_video": [[1, 2, 4], [2, 4, 4]]}


@pytest.mark.hf
@pytest.mark.parametrize("case", GRIDS)
def test_matches_transformers(hf_resampler, case):
    """fp32; ours under jit with a traced, zero-padded grid and padding features."""
    torch, hf, ours = hf_resampler
    grid = np.array(GRIDS[case])
    feats = _features(int(grid.prod(-1).sum()), seed=7)
    with torch.no_grad():
        ref = hf(torch.tensor(feats), torch.tensor(grid)).numpy()
    tokens, valid = _call(ours, *_pad(feats, grid))
    assert valid.sum() == len(ref) and valid[:len(ref)].all()
    assert np.abs(tokens[:len(ref)] - ref).max() <= 1e-5
