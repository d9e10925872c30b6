"""Cached prefill + decode logits equal the full forward's (recomputing the whole sequence) at every step, fp32,
for the dense, MoE (both the gathered-expert path of a few tokens and the training dispatch) and VL models;
with a quantized (int8 / int4) or Hadamard-rotated cache, within the error the scheme allows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import get_preset
from ernie_jax.inference import decode as fwd
from ernie_jax.inference.cache import init_cache, insert
from ernie_jax.model import create_model
from ernie_jax.quantization.kv_cache import KVCacheConfig
from ernie_jax.processor.prompt import SpecialTokens, Vision, encode_prompt
from random_weights import random_model

TOL = 1e-5


def _model(preset, **kw):
    """Every value random, the routers' correction biases too (selection != weighting)."""
    return random_model(get_preset(preset, **kw), seed=1, std=0.1)


@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, ids, mm):
    return nnx.merge(graphdef, state)(ids, **mm).logits


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(graphdef, length, kv_cache, state, ids, lengths, mm):
    model = nnx.merge(graphdef, state)
    out = fwd.prefill(model, ids, lengths, mm)
    cache = init_cache(model.config, ids.shape[0], length, kv_cache=kv_cache)
    return out["logits"], out["delta"], insert(cache, out["k"], out["v"], (), (), jnp.arange(ids.shape[0]))


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, ids, index, delta, cache):
    logits, _, cache = fwd.decode(nnx.merge(graphdef, state), ids, index, delta, cache)
    return logits, cache


def _check_steps(model, prompts, n_steps, mm_full=None, mm_prefill=None, prefill_len=None, kv_cache=None,
                 atol=TOL) -> np.ndarray:
    """Prefill the (right-padded) prompts, then feed random tokens one by one; the cached logits of every step
    must equal the full forward's over the whole sequence (causal: position t of the final sequence is what
    a recomputation at step t gives) within atol -> the differences |cached - full| [rows, n_steps + 1, V]."""
    g, st = nnx.split(model)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    p = prefill_len or int(lengths.max())
    ids = np.zeros((b, p), np.int32)
    for i, x in enumerate(prompts):
        ids[i, :len(x)] = x
    logits, delta, cache = _prefill(g, p + n_steps, kv_cache, st, jnp.asarray(ids), jnp.asarray(lengths),
                                    mm_prefill or {})
    assert cache.scheme == (kv_cache or KVCacheConfig())
    fed = np.random.RandomState(1).randint(3, model.config.vocab_size - 8, (b, n_steps)).astype(np.int32)
    got, index = [logits], jnp.asarray(lengths)
    for step in range(n_steps):
        logits, cache = _step(g, st, jnp.asarray(fed[:, step:step + 1]), index, delta, cache)
        got.append(logits[:, 0])
        index = index + 1
    got = np.stack([np.asarray(x) for x in got], axis=1)  # [B, n_steps + 1, V]
    full_ids = np.zeros((b, int(lengths.max()) + n_steps), np.int32)  # right padding: causal, never attended
    for i, x in enumerate(prompts):
        full_ids[i, :len(x) + n_steps] = list(x) + fed[i].tolist()
    ref = np.asarray(_full(g, st, jnp.asarray(full_ids), mm_full(full_ids.shape[1]) if mm_full else {}))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i], ref[i, n - 1:n + n_steps], atol=atol, rtol=0, err_msg=f"row {i}")
    return np.stack([np.abs(got[i] - ref[i, n - 1:n + n_steps]) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("preset", ["tiny-test", "tiny-moe-test"])
def test_cached_logits_equal_full_recompute(preset):
    """Three prompts of different lengths in one right-padded batch: 3 tokens x top-2 = 6 <= 8 experts, so the
    MoE decode takes the gathered-expert path."""
    _check_steps(_model(preset), [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]], 6)


def test_moe_decode_through_the_training_dispatch():
    """Eight rows: 8 x 2 slots > 8 experts, the decode step takes the configured (dropless) dispatch."""
    rs = np.random.RandomState(0)
    prompts = [rs.randint(3, 128, n).tolist() for n in (3, 5, 7, 9, 4, 6, 8, 2)]
    _check_steps(_model("tiny-moe-test"), prompts, 3)


def test_vl_image_prompt_decode_continues_3d_positions():
    """An image prompt: the ViT runs at prefill only; decode positions continue at index + rope delta."""
    model = _model("tiny-vl-test", moe_gmm_impl="ragged_dot")  # the fastest grouped matmul to compile on CPU
    c = model.config
    rs = np.random.RandomState(0)
    image = Vision.from_image(rs.randint(0, 256, (56, 84, 3), dtype=np.uint8))
    enc = encode_prompt([[5, 6, 7], image, [8, 9]], SpecialTokens.from_config(c))
    p = len(enc.input_ids)
    pix = {"pixel_values": jnp.asarray(image.patches, jnp.float32), "image_grid_thw": jnp.asarray([image.grid_thw])}

    def typed(n):
        pad = lambda a: np.pad(np.asarray(a), (0, n - p))[None]  # noqa: E731  generated tokens: text
        return {"mm_token_type_ids": jnp.asarray(pad(enc.mm_token_type_ids)),
                "moe_mm_token_type_ids": jnp.asarray(pad(enc.moe_mm_token_type_ids))}

    prefill_mm = {**pix, **typed(p + 3)}  # prefill padded to p + 3 positions
    _check_steps(model, [enc.input_ids.tolist()], 5, mm_full=lambda n: {**pix, **typed(n)},
                 mm_prefill=prefill_mm, prefill_len=p + 3)


QUANT_PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]


@functools.lru_cache(maxsize=None)
def _quant_model(outlier: float = 1.0):
    """tiny-test with head_dim 64 (a rotation over 16 channels spreads an outlier little); outlier > 1 scales
    one key-projection column of every layer: after RoPE its channel pair carries most of each key's
    magnitude, as the outlier channels of trained models' keys do."""
    model = create_model(get_preset("tiny-test", head_dim=64, initializer_range=0.1), seed=1)
    for stack in model.decoder.stacks:
        wk = stack.layers.attn.wk
        wk[...] = wk[...].at[..., 13].multiply(outlier)
    return model


def test_int8_cache_decode_close_to_full_recompute():
    """int8 codes, per-token per-head scales, no rotation: every step's logits within 0.03 of the fp32 full
    recompute (logits' std 0.5)."""
    err = _check_steps(_quant_model(), QUANT_PROMPTS, 6, kv_cache=KVCacheConfig(bits=8), atol=0.03)
    assert err.max() > 1e-4  # the cache is quantized


def test_hadamard_rotation_leaves_fp32_decode_unchanged():
    """Rotated K / V in an fp32 cache, queries rotated alike, output rotated back: the scores are unchanged in
    exact arithmetic, so the logits equal the full recompute's to fp32 rounding."""
    _check_steps(_quant_model(), QUANT_PROMPTS, 6, kv_cache=KVCacheConfig(hadamard=True, seed=5), atol=TOL)


def test_hadamard_shrinks_int4_error_with_an_outlier_key_channel():
    """An outlier channel sizes every key's int4 scale (max over D / 7), so the other channels round to a few
    codes; rotated, it is spread over the head. The logits' error against the fp32 recompute shrinks."""
    model = _quant_model(outlier=30.0)
    plain = _check_steps(model, QUANT_PROMPTS, 6, kv_cache=KVCacheConfig(bits=4), atol=1.0)
    rotated = _check_steps(model, QUANT_PROMPTS, 6, kv_cache=KVCacheConfig(bits=4, hadamard=True), atol=1.0)
    rms = lambda e: float(np.sqrt(np.mean(e ** 2)))  # noqa: E731
    print(f"int4 logit error with an outlier key channel: rms {rms(plain):.4f} max {plain.max():.3f}; "
          f"rotated rms {rms(rotated):.4f} max {rotated.max():.3f}")
    assert rms(rotated) < 0.8 * rms(plain) and rotated.max() < 0.9 * plain.max()
