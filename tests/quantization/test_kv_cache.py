"""KV-cache quantization: the round trip within half a scale step of every element (scales recomputed here
in numpy), int4 packing two per byte, the scheme's validation, and the cache bytes per token by hand (equal
to the bytes of the cache arrays)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax import get_preset
from ernie_jax.inference.cache import bytes_per_token, init_cache
from ernie_jax.quantization.kv_cache import (KVCacheConfig, QuantizedKV, dequantize, pack_int4, quantize,
                                             unpack_int4)


def _keys() -> np.ndarray:
    """[B, Hkv, T, D] fp32 keys: gaussian, an outlier channel, one all-zero vector."""
    x = np.random.RandomState(0).randn(2, 3, 9, 32).astype(np.float32)
    x[..., 5] *= 25.0
    x[1, 2, 4] = 0.0
    return x


@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_round_trip_within_half_a_step(bits, qmax):
    x = _keys()
    q = quantize(jnp.asarray(x), bits)
    scale = np.abs(x.astype(np.float64)).max(-1) / qmax  # per token, per head
    assert q.scale.shape == x.shape[:-1] and q.scale.dtype == jnp.float32
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    back = np.asarray(dequantize(q, jnp.float32), np.float64)
    err = np.abs(back - x)
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12).all(), (err / scale[..., None]).max()
    assert (err.max(-1) > scale / 8).mean() > 0.9  # not trivially exact: the error is of the step's size
    assert (back[1, 2, 4] == 0).all()
    codes = np.asarray(unpack_int4(q.codes) if bits == 4 else q.codes)
    assert codes.min() >= -qmax and codes.max() <= qmax
    assert (np.abs(codes).max(-1)[scale > 0] == qmax).all()  # the largest element maps to the top code


def test_int4_packs_two_per_byte():
    codes = np.array([[-8, 7, -1, 0, 3, -5, 1, -7]], np.int8)
    packed = np.asarray(pack_int4(jnp.asarray(codes)))
    assert packed.dtype == np.uint8 and packed.shape == (1, 4)
    nib = codes.astype(np.uint8) & 0xF
    np.testing.assert_array_equal(packed, nib[:, 0::2] | (nib[:, 1::2] << 4))  # even channel in the low nibble
    np.testing.assert_array_equal(unpack_int4(jnp.asarray(packed)), codes)
    every = np.stack(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8)), -1).reshape(-1, 2).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(jnp.asarray(every))), every)


@pytest.mark.parametrize("kw, match", [
    (dict(bits=3), "bits=3"), (dict(bits=16), "bits=16"), (dict(bits=True), "bits=True"), (dict(bits=8.0), "bits=8.0"),
    (dict(bits="8"), "bits='8'"),
    (dict(bits=8, hadamard="yes"), "hadamard='yes'"), (dict(bits=8, seed=-1), "seed=-1"),
])
def test_bad_scheme_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        KVCacheConfig(**kw)


def test_hadamard_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="head_dim=24"):
        init_cache(get_preset("tiny-test", head_dim=24), 1, 8, kv_cache=KVCacheConfig(bits=8, hadamard=True))
    init_cache(get_preset("tiny-test", head_dim=24), 1, 8, kv_cache=KVCacheConfig(bits=8))  # no rotation: fine


def test_bytes_per_token_by_hand():
    cfg = get_preset("tiny-moe-test")  # 3 layers, 2 kv heads, head_dim 16, fp32 compute
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.dtype) == (3, 2, 16, "float32")
    # K + V, (3 layers + 1 MTP depth), 2 kv heads, per head: D values (+ one fp32 scale when quantized)
    by_hand = {None: 2 * 4 * 2 * (16 * 4), 8: 2 * 4 * 2 * (16 + 4), 4: 2 * 4 * 2 * (8 + 4)}
    assert by_hand == {None: 1024, 8: 320, 4: 192}
    for bits, want in by_hand.items():
        assert bytes_per_token(cfg, mtp_depths=1, kv_bits=bits) == want
        cache = init_cache(cfg, 3, 40, mtp_depths=1, kv_cache=KVCacheConfig(bits=bits))
        arrays = [a for part in (cache.k, cache.v, cache.mtp_k, cache.mtp_v) for a in part]
        total = sum(x.nbytes for a in arrays for x in ((a.codes, a.scale) if bits else (a,)))
        assert total == want * 3 * 40
        if bits:
            assert all(isinstance(a, QuantizedKV) and a.bits == bits for a in arrays)
            assert cache.k[1].codes.shape == (2, 3, 2, 40, 16 if bits == 8 else 8)  # [L, B, Hkv, T, D or D/2]
            assert cache.k[1].scale.shape == (2, 3, 2, 40)
    with pytest.raises(ValueError, match="kv_bits=2"):
        bytes_per_token(cfg, kv_bits=2)
