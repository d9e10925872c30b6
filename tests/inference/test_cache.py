"""The KV cache: one k / v pair per scanned stack, sharded like the activations (a quantized cache's scales
too), bytes per token, and `insert` writing prefilled rows into their slots only (quantized: encoded)."""

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax import get_preset
from ernie_jax.inference.cache import bytes_per_token, init_cache, insert
from ernie_jax.quantization import hadamard
from ernie_jax.quantization.kv_cache import KVCacheConfig, dequantize
from ernie_jax.sharding import MeshConfig, activate, make_mesh

CFG = get_preset("tiny-moe-test")  # layers [dense, moe, moe]: two stacks


def test_layout_and_bytes_per_token():
    cache = init_cache(CFG, 3, 40, mtp_depths=1)
    assert [a.shape for a in cache.k] == [(1, 3, 2, 40, 16), (2, 3, 2, 40, 16)]  # [L, B, Hkv, T, D] per stack
    assert [a.shape for a in cache.mtp_v] == [(3, 2, 40, 16)]
    total = sum(a.nbytes for a in cache.k + cache.v + cache.mtp_k + cache.mtp_v)
    assert bytes_per_token(CFG, mtp_depths=1) * 3 * 40 == total
    assert CFG.dtype == "float32" and bytes_per_token(CFG, mtp_depths=1) == 2 * (3 + 1) * 2 * 16 * 4  # K+V, layers+MTP, Hkv, D, fp32


def test_cache_shards_batch_and_kv_heads():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with activate(mesh, "fsdp_tensor"):
        cache = jax.jit(lambda: init_cache(CFG, 4, 32))()
    assert tuple(cache.k[1].sharding.spec[:3]) == (None, ("data", "fsdp"), "tensor")  # layers, batch, kv heads
    assert all(s is None for s in cache.k[1].sharding.spec[3:])
    with activate(mesh, "fsdp_tensor"):
        q = jax.jit(lambda: init_cache(CFG, 4, 32, mtp_depths=1, kv_cache=KVCacheConfig(bits=4)))()
    for a, spec in ((q.k[1].codes, q.k[1].codes.sharding.spec), (q.v[0].scale, q.v[0].scale.sharding.spec)):
        assert tuple(spec[:3]) == (None, ("data", "fsdp"), "tensor") and all(s is None for s in spec[3:]), a.shape
    assert tuple(q.mtp_k[0].scale.sharding.spec[:2]) == (("data", "fsdp"), "tensor")


def test_insert_writes_only_the_given_slots():
    cache = init_cache(CFG, 4, 16)
    k = tuple(jnp.ones((a.shape[0], 2, 2, 5, 16)) for a in cache.k)
    out = insert(cache, k, k, (), (), jnp.asarray([2, 4]))  # slot 4 >= batch: a padding row, dropped
    got = np.asarray(out.k[1])
    assert (got[:, 2, :, :5] == 1).all() and (got[:, 2, :, 5:] == 0).all()
    assert (got[:, [0, 1, 3]] == 0).all()


def test_insert_quantizes_into_the_given_slots():
    """An int8 rotated cache: the inserted rows hold R k quantized (read back within half a step), the other
    slots and positions stay zero."""
    scheme = KVCacheConfig(bits=8, hadamard=True, seed=1)
    cache = init_cache(CFG, 4, 16, kv_cache=scheme)
    rs = np.random.RandomState(0)
    k = tuple(jnp.asarray(rs.randn(a.codes.shape[0], 2, 2, 5, 16), jnp.float32) for a in cache.k)
    out = insert(cache, k, k, (), (), jnp.asarray([2, 4]))
    assert out.scheme == scheme
    got = np.asarray(dequantize(out.k[1], jnp.float32))
    want = np.asarray(hadamard.rotate(k[1][:, 0], seed=1))  # row 0 of the prefill batch -> slot 2
    step = np.abs(want).max(-1, keepdims=True) / 127
    assert (np.abs(got[:, 2, :, :5] - want) <= step / 2 * (1 + 1e-5)).all()
    assert (got[:, 2, :, 5:] == 0).all() and (got[:, [0, 1, 3]] == 0).all()
    assert (np.asarray(out.k[1].scale)[:, [0, 1, 3]] == 0).all()
