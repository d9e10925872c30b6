"""TPU ahead-of-time compile tier for KV-cache decoding: the engine's decode chunk on a virtual TPU v5p chip.

`ernie_jax.inference.engine._decode_chunk` (what `Engine.step` runs: `chunk` decode steps of every slot in a
`while_loop`, sampling included) is lowered for one compile-only chip of a `v5p:2x2x1` topology (libtpu, no
TPU) with the 0.3B preset at bf16 compute (`get_preset("ernie-4.5-0.3b", dtype="bfloat16")`: fp32 parameters,
as a training checkpoint holds them), abstract parameters (`abstract_model`) and a cache of 8 rows x 2048
positions, cache and slot state donated as the engine donates them. Checks:

* it compiles to a TPU program (tiled `T(8,128)` layouts);
* donation holds: every cache and slot array is an input/output alias in the HLO, and the aliased bytes
  cover the whole cache (a lost donation would double the cache in HBM);
* arguments are the parameters + the cache (+ the slot state, a few KiB), outputs the cache (+ slots and
  the chunk's tokens);
* the cache is updated in place: no second [L, B, Hkv, T, D] cache in the scratch (the decoder's layer scan
  carries each stack's cache and scatters the new tokens into it; a scan that takes the cache as scanned
  input and stacks it as scanned output builds a new cache every step and copies it into the donated one);
* the memory figure: argument + output + temp - alias (the peak `memory_analysis()` implies) stays within
  the bound derived from the parameter and cache bytes: the fp32 parameters, their bf16 compute copy (the
  casts are loop-invariant and hoisted out of the `while_loop`), one transposed bf16 copy of the tied
  embedding for the head, one cache, and `SLACK` for one step's activations, the attended layer's K / V
  slices and relayout copies of small weights.

The same chunk with an int8 cache (`KVCacheConfig(bits=8)`: int8 codes and fp32 per-token scales, read
dequantized layer by layer): it compiles with the cache donated, its arguments hold (D + 4) / 2D of the bf16
cache's bytes, and its peak is below the bf16 cache's.

Run: `pytest tests/tpu_aot/test_decode_aot.py -v -s` (the figures print with `-s`; docs/benchmarks.md quotes
them). Outside pytest, `python tests/tpu_aot/test_decode_aot.py --batch 8 --length 2048 --param-dtype float32`
prints them for other shapes.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see test_model_aot.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import ernie_jax  # noqa: E402
from ernie_jax.inference import bytes_per_token  # noqa: E402
from ernie_jax.inference.engine import _decode_chunk, _init  # noqa: E402
from ernie_jax.model import abstract_model  # noqa: E402
from ernie_jax.quantization.kv_cache import KVCacheConfig  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402

_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

TOPOLOGY = "v5p:2x2x1"
HBM_BYTES = 95 * 2**30  # TPU v5p, per chip
MIB = 2**20
SLACK = 128 * MIB  # one step's activations (logits [8, 103424] fp32: 3.2 MiB), a layer's K + V slices (16 MiB
# at 8 x 2048), relayout copies of the small kv projections


def _nbytes(tree) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def compile_decode(batch: int = 8, length: int = 2048, chunk: int = 8, param_dtype: str = "float32",
                   kv_bits: int | None = None) -> dict:
    """Lowers and compiles `_decode_chunk` for one v5p chip -> the compiled program and the bytes it is checked
    against."""
    device = virtual_tpu_devices(TOPOLOGY)[0]  # one chip: the 0.3B model serves from a single chip
    on_chip = NamedSharding(Mesh(np.array([device]), ("x",)), P())

    def place(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip), tree)

    cfg = ernie_jax.get_preset("ernie-4.5-0.3b", dtype="bfloat16", param_dtype=param_dtype)
    graphdef, state = nnx.split(abstract_model(cfg))
    kv = KVCacheConfig(bits=kv_bits)
    cache, slots = jax.eval_shape(lambda: _init(cfg, batch, length, False, cfg.vocab_size, kv))
    state, cache, slots = place(state), place(cache), place(slots)
    stop = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=on_chip)
    t0 = time.perf_counter()
    # jax's default matmul precision, as the engine runs (tests/conftest.py raises it for the CPU tests)
    with jax.default_matmul_precision(None):
        # layers=None: the scanned layers, as an engine on a TPU runs them (`Engine(unstack_layers=)`)
        compiled = _decode_chunk.lower(graphdef, state, cache, slots, stop, layers=None, chunk=chunk).compile()
    compile_s = time.perf_counter() - t0
    params = _nbytes(state)
    embed = cfg.vocab_size * cfg.hidden_size
    return dict(
        cfg=cfg, compiled=compiled, mem=compiled.memory_analysis(), hlo=compiled.as_text(), compile_s=compile_s,
        params=params, compute_copy=0 if param_dtype == "bfloat16" else params // 2,
        head_copy=2 * embed if cfg.tie_word_embeddings else 0, cache=_nbytes(cache), slots=_nbytes(slots),
        n_donated=len(jax.tree.leaves(cache)) + len(jax.tree.leaves(slots)),
        tokens=batch * chunk * 4, bpt=bytes_per_token(cfg, kv_bits=kv_bits), batch=batch, length=length,
        chunk=chunk, kv_bits=kv_bits)


def peak(m) -> int:
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def report(r: dict) -> str:
    m = r["mem"]
    return (f"decode chunk ({r['chunk']} steps), ernie-4.5-0.3b bf16 compute / {r['cfg'].param_dtype} parameters, "
            f"{'int8' if r['kv_bits'] == 8 else 'int4' if r['kv_bits'] == 4 else 'bf16'} cache {r['batch']} x "
            f"{r['length']} ({r['bpt']:,} bytes per token), one {TOPOLOGY} chip: compile "
            f"{r['compile_s']:.1f} s; parameters {r['params'] / MIB:.1f} MiB, cache {r['cache'] / MIB:.1f} MiB; "
            f"argument {m.argument_size_in_bytes / MIB:.1f} MiB, output {m.output_size_in_bytes / MIB:.1f} MiB, "
            f"alias {m.alias_size_in_bytes / MIB:.1f} MiB, temp {m.temp_size_in_bytes / MIB:.1f} MiB, "
            f"code {m.generated_code_size_in_bytes / MIB:.1f} MiB; argument + output + temp - alias "
            f"{peak(m) / MIB:.1f} MiB")


@pytest.fixture(scope="module")
def decode():
    r = compile_decode()
    print("\n" + report(r))
    return r


def _check_donated(r: dict) -> None:
    alias = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", r["hlo"])
    assert alias is not None, "no input_output_alias in the compiled module: the cache is not donated"
    assert len(re.findall(r"may-alias|must-alias", alias.group(1))) == r["n_donated"]
    assert r["cache"] <= r["mem"].alias_size_in_bytes <= r["cache"] + r["slots"] + MIB


def test_decode_chunk_compiles_with_cache_donated(decode):
    r, m = decode, decode["mem"]
    assert ":T(8,128)" in r["hlo"], "no TPU tiled layouts in the compiled HLO"
    assert {d.platform for s in jax.tree.leaves(r["compiled"].input_shardings) for d in s.device_set} == {"tpu"}

    # Donation: every cache / slot array is aliased to its output, and the aliased bytes cover the cache.
    _check_donated(r)

    # Arguments: parameters + cache + slot state (+ the stop mask); TPU tile padding only on the small arrays.
    base = r["params"] + r["cache"] + r["slots"]
    assert base <= m.argument_size_in_bytes <= base + MIB
    # Outputs: the cache and slots (aliased) plus the chunk's tokens [B, chunk, 1] int32.
    assert m.alias_size_in_bytes <= m.output_size_in_bytes <= m.alias_size_in_bytes + r["tokens"] + MIB


def test_cache_updated_in_place(decode):
    r, m = decode, decode["mem"]
    # Without a second cache, temp is the bf16 weights, the head's transposed copy and one step's buffers.
    assert m.temp_size_in_bytes <= r["compute_copy"] + r["head_copy"] + r["cache"] // 2, (
        f"temp {m.temp_size_in_bytes / MIB:.1f} MiB: a second KV cache ({r['cache'] / MIB:.1f} MiB) in the scratch?")


def test_decode_memory_within_bound(decode):
    r, m = decode, decode["mem"]
    bound = r["params"] + r["compute_copy"] + r["head_copy"] + r["cache"] + SLACK
    assert peak(m) <= bound, (f"peak {peak(m) / MIB:.1f} MiB > bound {bound / MIB:.1f} MiB (params + bf16 copy + "
                              f"head copy + cache + {SLACK / MIB:.0f} MiB)")
    assert peak(m) < HBM_BYTES


def test_int8_cache_decode_chunk(decode):
    """The int8 cache (codes + fp32 scales per token and kv head) in the same decode chunk."""
    r, m = compile_decode(kv_bits=8), decode["mem"]
    print("\n" + report(r))
    d = r["cfg"].head_dim
    assert r["cache"] == r["bpt"] * r["batch"] * r["length"] == decode["cache"] * (d + 4) // (2 * d)
    assert ":T(8,128)" in r["hlo"] and "s8[18,8,2,2048,128]" in r["hlo"]
    _check_donated(r)
    base = r["params"] + r["cache"] + r["slots"]
    assert base <= r["mem"].argument_size_in_bytes <= base + MIB
    assert peak(r["mem"]) < peak(m), "the int8 cache does not lower the decode chunk's peak"


if __name__ == "__main__":  # other shapes, outside pytest
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kv-bits", type=int, default=None, choices=(8, 4))
    a = p.parse_args()
    if _MISSING:
        raise SystemExit(_MISSING)
    print(report(compile_decode(a.batch, a.length, a.chunk, a.param_dtype, a.kv_bits)))
