import numpy as np
import jax.numpy as jnp

from ernie_jax.model.rope import apply_interleaved_rope, rope_angles


def _hf_rope_numpy(x, pos, theta):
    """transformers' Ernie4_5 apply_rotary_pos_emb, transcribed to numpy. x [B, S, N, D]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = pos[..., None].astype(np.float32) * inv
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, :, None], np.sin(emb)[:, :, None]
    cos = np.repeat(cos[..., : d // 2], 2, -1)
    sin = np.repeat(sin[..., : d // 2], 2, -1)
    rot = np.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)
    return x * cos + rot * sin


def test_interleaved_rope_matches_transformers_formula():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 7, 3, 16).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(100, 107)]).astype(np.int32)
    ours = np.asarray(apply_interleaved_rope(jnp.asarray(x), rope_angles(jnp.asarray(pos), 16, 500000.0)))
    np.testing.assert_allclose(ours, _hf_rope_numpy(x, pos, 500000.0), atol=2e-6)
    # the NeoX rotate-half layout would be a different function: make sure we are not accidentally it
    half = np.concatenate([-x[..., 8:], x[..., :8]], -1)
    freqs = pos[..., None] * (1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16)))
    neox = x * np.cos(np.concatenate([freqs] * 2, -1))[:, :, None] + half * np.sin(np.concatenate([freqs] * 2, -1))[:, :, None]
    assert np.abs(ours - neox).max() > 1e-2


def test_rope_keeps_dtype_and_norm():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    y = apply_interleaved_rope(x, rope_angles(jnp.arange(4)[None], 8, 10000.0))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float32), axis=-1), np.sqrt(8), rtol=1e-2)
