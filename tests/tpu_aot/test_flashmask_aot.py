"""TPU ahead-of-time compile tier for the FlashMask kernels (pallas_kernels.flashmask), CPU-only host.

The real Mosaic lowering and TPU compiler run for virtual `v5p:2x2x1` and `v6e:2x2` slices (libtpu from
PyPI, no TPU): forward, and forward + backward (`jax.value_and_grad` w.r.t. q, k, v: the forward kernel,
then the dk/dv and dq kernels), bf16, GQA 16/4 heads, head_dim 128, S = 4096 packed documents (causal
document mask from segment ids, built inside the program). A Mosaic kernel cannot be auto-partitioned, so
the op runs inside `jax.shard_map` over the topology mesh (batch split over the 4 chips, AxisType.Auto,
explicit in/out shardings). Checks: a TPU program with one Mosaic custom call per kernel (1 forward,
3 forward + backward); arguments / outputs are the per-chip q/k/v/ids (and gradient) bytes. The table
prints with `pytest tests/tpu_aot/test_flashmask_aot.py -s`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see test_model_aot.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from pallas_kernels.flashmask import causal_document_mask, flashmask_attention  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402


_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]
MIB = 2**20
AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Case:
    topology: str
    mode: str  # "forward" | "train"
    batch_per_chip: int = 1
    seq: int = 4096
    q_heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128

    @property
    def id(self) -> str:
        return f"{self.topology.replace(':', '-')}-{self.mode}"


CASES = [Case(t, m) for t in ("v5p:2x2x1", "v6e:2x2") for m in ("forward", "train")]


@functools.lru_cache(maxsize=None)
def topology_mesh(name: str) -> jax.sharding.Mesh:
    devices = virtual_tpu_devices(name)
    return jax.sharding.Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def compile_case(c: Case):
    mesh = topology_mesh(c.topology)
    n = mesh.size
    b = c.batch_per_chip * n
    spec = P(AXIS, None, None, None)

    def local(q, k, v, seg):
        idx = causal_document_mask(seg)
        return flashmask_attention(q, k, v, idx, causal=True, interpret=False)

    attn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(AXIS, None)), out_specs=spec)
    qs = jax.ShapeDtypeStruct((b, c.seq, c.q_heads, c.head_dim), jnp.bfloat16)
    ks = jax.ShapeDtypeStruct((b, c.seq, c.kv_heads, c.head_dim), jnp.bfloat16)
    segs = jax.ShapeDtypeStruct((b, c.seq), jnp.int32)
    sh, seg_sh = NamedSharding(mesh, spec), NamedSharding(mesh, P(AXIS, None))
    if c.mode == "forward":
        fn = jax.jit(attn, in_shardings=(sh, sh, sh, seg_sh), out_shardings=sh)
    else:
        def loss(q, k, v, seg):
            return jnp.mean(attn(q, k, v, seg).astype(jnp.float32) ** 2)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(sh, sh, sh, seg_sh),
                     out_shardings=(NamedSharding(mesh, P()), (sh, sh, sh)))
    t0 = time.perf_counter()
    with jax.default_matmul_precision(None):
        compiled = fn.lower(qs, ks, ks, segs).compile()
    return compiled, time.perf_counter() - t0, (qs, ks, segs), n


_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _ROWS:
        print("\n\n| topology | mode | B x S x Hq/Hkv x D | compile s | argument MiB | output MiB | temp MiB | "
              "Mosaic calls |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(_ROWS))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flashmask_aot(case: Case):
    compiled, secs, (qs, ks, segs), n = compile_case(case)
    hlo = compiled.as_text()
    m = compiled.memory_analysis()
    calls = hlo.count('custom_call_target="tpu_custom_call"')
    _ROWS.append(f"| {case.topology} | {case.mode} | {qs.shape[0]}x{case.seq}x{case.q_heads}/{case.kv_heads}x"
                 f"{case.head_dim} | {secs:.1f} | {m.argument_size_in_bytes / MIB:.2f} | "
                 f"{m.output_size_in_bytes / MIB:.2f} | {m.temp_size_in_bytes / MIB:.2f} | {calls} |")
    print("\n" + _ROWS[-1])
    assert ":T(8,128)" in hlo or ":T(" in hlo
    assert calls == (1 if case.mode == "forward" else 3)
    for name in (["flashmask_fwd"] + (["flashmask_bwd_dkv", "flashmask_bwd_dq"] if case.mode == "train" else [])):
        assert name in hlo, name
    nb = lambda s: int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize // n
    args = nb(qs) + 2 * nb(ks) + nb(segs)
    assert m.argument_size_in_bytes == args
    if case.mode == "forward":
        assert m.output_size_in_bytes == nb(qs)
    else:
        assert nb(qs) + 2 * nb(ks) <= m.output_size_in_bytes <= nb(qs) + 2 * nb(ks) + 1024


# The model with attention_impl="flashmask" under the sharded mesh of training (MeshConfig fsdp = the 4
# chips, rules "fsdp", `activate` as the trainer does): `_flashmask_attention` wraps the kernel in a
# shard_map over the mesh, without which the TPU compile fails (a Mosaic kernel cannot be auto-partitioned).
# `tiny` with head_dim 128 and bf16 compute, 4 x 256 packed rows (segment ids + padding mask as inputs).
MODEL_MODES = ("forward", "train")


@pytest.mark.parametrize("mode", MODEL_MODES)
def test_model_flashmask_sharded_aot(mode):
    from flax import nnx

    import ernie_jax
    from ernie_jax.model import abstract_model
    from ernie_jax.sharding import MeshConfig, activate, make_mesh, param_shardings, resolve_rules

    devices = virtual_tpu_devices("v5p:2x2x1")
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    # 6 layers: stacks of <= 4 are unrolled (decoder.LayerStack), deeper ones stay one scan
    cfg = ernie_jax.get_preset("tiny", num_hidden_layers=6, head_dim=128, dtype="bfloat16",
                               attention_impl="flashmask")
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abs_state, mesh, resolve_rules("fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp", "expert"), None))
    ids = jax.ShapeDtypeStruct((len(devices), 256), jnp.int32)

    def logits_fn(state, input_ids, seg, am):
        return nnx.merge(graphdef, state)(input_ids, segment_ids=seg, attention_mask=am).logits

    if mode == "forward":
        fn = jax.jit(logits_fn, in_shardings=(shardings, batch, batch, batch))
    else:
        def loss(state, input_ids, seg, am):
            return jnp.mean(logits_fn(state, input_ids, seg, am).astype(jnp.float32) ** 2)
        fn = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch, batch, batch),
                     out_shardings=(NamedSharding(mesh, P()), shardings))
    t0 = time.perf_counter()
    with activate(mesh, "fsdp"), jax.default_matmul_precision(None):
        traced = fn.trace(abs_state, ids, ids, ids)
        assert "shard_map" in str(traced.jaxpr)
        compiled = traced.lower().compile()
    hlo = compiled.as_text()
    calls = hlo.count('custom_call_target="tpu_custom_call"')
    print(f"\nmodel flashmask {mode} v5p:2x2x1 fsdp=4 4x256: compile {time.perf_counter() - t0:.1f} s, "
          f"{calls} Mosaic calls")
    assert ":T(8,128)" in hlo
    # the layers run under one scan: one call per kernel, in its body
    assert calls == (1 if mode == "forward" else 3)
    for name in (["flashmask_fwd"] + (["flashmask_bwd_dkv", "flashmask_bwd_dq"] if mode == "train" else [])):
        assert name in hlo, name
