"""TPU ahead-of-time compile tier: our model compiled for virtual TPU topologies, on a CPU-only host.

`jax.experimental.topologies.get_topology_desc("v5p:2x2x1", "tpu")` gives compile-only TPU devices
(libtpu from PyPI, no TPU needed); a mesh over them, explicit in/out shardings and `.lower(...)
.compile()` run the real TPU compiler, and `compiled.memory_analysis()` reports the per-device HBM
footprint. Every case is checked against what the shardings imply:

* arguments: exactly the per-device (sharded) parameter + input bytes after TPU tile padding, taken
  from the compiled input layouts, and at least the unpadded bytes computed from our own shardings;
* outputs: logits [B/n, S, V] fp32 per device (forward) or loss + gradients sharded like the
  parameters (forward+backward);
* the program is a TPU one (tiled `T(8,128)`-style layouts, TPU devices) and FSDP really partitions
  (all-gather of weights; reduce-scatter / all-reduce of gradients).

Run: `pytest tests/tpu_aot -v -s` (the table of numbers prints with `-s`). Outside pytest,
`python tests/tpu_aot/test_model_aot.py --preset ernie-4.5-0.3b --seq 2048 --batch-per-chip 2` compiles
other shapes and prints the same table. Notes and measured numbers: docs/tpu_aot.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

# libtpu guards itself with /tmp/libtpu_lockfile: a second process that initialises it (another
# pytest-xdist worker, or any jax process started without JAX_PLATFORMS=cpu) would otherwise fail with
# "ABORTED: Internal error when accessing libtpu multi-process lockfile". Compile-only use needs no
# exclusive TPU access. Read when the TPU plugin is initialised, i.e. at the first topology below.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import ernie_jax  # noqa: E402
from ernie_jax.model import abstract_model  # noqa: E402
from ernie_jax.sharding import MeshConfig, activate, make_mesh, param_shardings, resolve_rules  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402


_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

BATCH_SPEC = P(("data", "fsdp", "expert"), None)  # the batch follows the `act_batch` rule
HBM_GIB = {"TPU v4": 32, "TPU v5": 95, "TPU v5 lite": 16, "TPU v6 lite": 32}  # per chip (v5 = v5p)
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Case:
    topology: str  # jax.experimental.topologies name, e.g. "v5p:2x2x1"
    preset: str
    mode: str  # "forward" | "train" (value_and_grad of the mean cross-entropy w.r.t. the parameters)
    batch_per_chip: int
    seq: int
    remat: str = "full"  # remat policy of the real presets (tiny keeps its own: none)

    @property
    def id(self) -> str:
        return f"{self.topology.replace(':', '-')}-{self.preset}-{self.mode}"


def config_for(case: Case) -> ernie_jax.ErnieConfig:
    if case.preset == "tiny":
        return ernie_jax.get_preset("tiny")  # fp32 compute and parameters, no remat
    # The training set-up of a real preset: bf16 compute on fp32 master weights, full remat.
    return ernie_jax.get_preset(case.preset, dtype="bfloat16", param_dtype="float32", remat_policy=case.remat)


TOPOLOGIES = ("v5p:2x2x1", "v6e:2x2")  # 4 chips each
# Real 0.3B shapes at a short sequence (TPU compile time on 2 CPU cores grows with B*S, so one row of 128
# tokens per chip, still a whole lane tile): training on the training chip, the forward on the serving chip.
# The tiny model (dims that pad) adds the other mode on each topology, so each topology compiles both modes
# and both sizes are checked in both modes.
CASES = [Case("v5p:2x2x1", "tiny", "forward", 2, 128), Case("v6e:2x2", "tiny", "train", 2, 128),
         Case("v5p:2x2x1", "ernie-4.5-0.3b", "train", 1, 128), Case("v6e:2x2", "ernie-4.5-0.3b", "forward", 1, 128)]


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
    return virtual_tpu_devices(name)


def _local_shape(shape, sharding) -> list[int]:
    return list(sharding.shard_shape(tuple(shape)))


def sharded_bytes(avals, shardings) -> int:
    """Per-device bytes of arrays with these shardings, no padding (from our shardings alone)."""
    return sum(math.prod(_local_shape(a.shape, s)) * np.dtype(a.dtype).itemsize for a, s in zip(avals, shardings))


def tiled_bytes(avals, formats) -> int:
    """Per-device bytes with the TPU layout's tile padding: the first tile of each compiled layout pads
    the array's minor-most dimensions (e.g. f32 [.., 2, 64] under T(2,128) holds [.., 2, 128])."""
    total = 0
    for a, f in zip(avals, formats):
        shape = _local_shape(a.shape, f.sharding) or [1]  # a scalar takes one tile row
        tiles = f.layout.tiling
        if tiles:
            tile = tiles[0]
            order = list(f.layout.major_to_minor) or [0]
            for d, t in zip(order[len(order) - len(tile):], tile):
                shape[d] = -(-shape[d] // t) * t
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


@dataclasses.dataclass
class Result:
    case: Case
    chips: int
    device_kind: str
    compile_s: float
    mem: object  # CompiledMemoryStats
    param_bytes_total: int  # all parameters, unsharded
    param_bytes_device: int  # per device, unpadded, from our shardings
    input_bytes_device: int  # ids (+ labels), per device
    hlo: str
    compiled: object
    in_avals: list
    out_avals: list


def compile_case(case: Case) -> Result:
    devices = topology_devices(case.topology)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    cfg = config_for(case)
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abs_state, mesh, resolve_rules("fsdp"))
    batch = NamedSharding(mesh, BATCH_SPEC)
    ids = jax.ShapeDtypeStruct((case.batch_per_chip * len(devices), case.seq), jnp.int32)

    if case.mode == "forward":
        def fn(state, input_ids):
            return nnx.merge(graphdef, state)(input_ids).logits

        jitted = jax.jit(fn, in_shardings=(shardings, batch),
                         out_shardings=NamedSharding(mesh, P(*BATCH_SPEC, None)))
        args = (abs_state, ids)
    elif case.mode == "train":
        def loss_fn(state, input_ids, labels):
            logits = nnx.merge(graphdef, state)(input_ids).logits  # fp32
            target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

        jitted = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(shardings, batch, batch),
                         out_shardings=(NamedSharding(mesh, P()), shardings))
        args = (abs_state, ids, ids)
    else:
        raise ValueError(case.mode)

    t0 = time.perf_counter()
    # Activation constraints (logical rules) apply while tracing. The matmul precision is jax's default,
    # as in training: tests/conftest.py raises it to "highest" for the CPU parity tests, which on TPU
    # would turn every f32 dot into a 6-pass bf16 one (other code, slower compile).
    with activate(mesh, "fsdp"), jax.default_matmul_precision(None):
        lowered = jitted.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    param_avals = jax.tree.leaves(abs_state)
    param_shards = jax.tree.leaves(shardings)
    n_inputs = len(args) - 1
    return Result(
        case=case, chips=len(devices), device_kind=devices[0].device_kind, compile_s=compile_s,
        mem=compiled.memory_analysis(),
        param_bytes_total=sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in param_avals),
        param_bytes_device=sharded_bytes(param_avals, param_shards),
        input_bytes_device=n_inputs * sharded_bytes([ids], [batch]),
        hlo=compiled.as_text(), compiled=compiled,
        in_avals=jax.tree.leaves(compiled.in_avals), out_avals=jax.tree.leaves(compiled.out_info))


def row(r: Result) -> str:
    m = r.mem
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    c = r.case
    remat = "none" if c.preset == "tiny" else c.remat
    return (f"| {c.topology} | {c.preset} | {c.mode} | {remat} | {c.batch_per_chip * r.chips}x{c.seq} | "
            f"{r.compile_s:.1f} | {r.param_bytes_device / MIB:.2f} | {m.argument_size_in_bytes / MIB:.2f} | "
            f"{m.output_size_in_bytes / MIB:.2f} | {m.temp_size_in_bytes / MIB:.2f} | "
            f"{m.generated_code_size_in_bytes / MIB:.2f} | {peak / MIB:.2f} |")


TABLE_HEADER = ("| topology | preset | mode | remat | B x S | compile s | params/dev MiB | argument MiB | output MiB | "
                "temp MiB | code MiB | arg+out+temp MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _ROWS:
        print(f"\n\nTPU AOT memory_analysis per device (jax {jax.__version__}, libtpu "
              f"{_libtpu_version()}):\n{TABLE_HEADER}\n" + "\n".join(_ROWS))


def _libtpu_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "?"


@pytest.mark.parametrize("name,chips,kind", [("v5p:2x2x1", 4, "TPU v5"), ("v6e:2x2", 4, "TPU v6 lite")])
def test_topology_devices(name, chips, kind):
    devices = topology_devices(name)
    assert len(devices) == chips
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {kind}
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    assert dict(mesh.shape) == {"data": 1, "pipeline": 1, "fsdp": chips, "expert": 1, "tensor": 1}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    # The compile-only TPU devices live beside the default (CPU) backend, which stays the default.
    assert jax.default_backend() == "cpu"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_aot_compile(case: Case):
    r = compile_case(case)
    _ROWS.append(row(r))
    print("\n" + row(r))
    m, compiled = r.mem, r.compiled

    # A TPU program over the topology's chips.
    assert r.device_kind in HBM_GIB
    assert ":T(8,128)" in r.hlo, "no TPU tiled layouts in the compiled HLO"
    in_formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
    out_formats = jax.tree.leaves(compiled.output_formats, is_leaf=lambda x: hasattr(x, "layout"))
    assert {d.platform for f in in_formats for d in f.sharding.device_set} == {"tpu"}
    assert len(in_formats) == len(r.in_avals) and len(out_formats) == len(r.out_avals)

    # FSDP partitions: weights are all-gathered; gradients are reduced across the batch shards.
    assert "all-gather" in r.hlo
    if case.mode == "train":
        assert "reduce-scatter" in r.hlo or "all-reduce" in r.hlo

    # Arguments: exactly the sharded parameters + ids (+ labels), with TPU tile padding.
    expected_unpadded = r.param_bytes_device + r.input_bytes_device
    assert m.argument_size_in_bytes == tiled_bytes(r.in_avals, in_formats)
    assert expected_unpadded <= m.argument_size_in_bytes
    if case.preset != "tiny":  # 0.3B dims are multiples of 128: next to no padding, and ~1/n of the model each
        assert m.argument_size_in_bytes <= 1.001 * expected_unpadded
        assert r.param_bytes_device <= 1.001 * r.param_bytes_total / r.chips
    else:  # tiny: head_dim 64 / hidden 128 / 4 chips give [.., 32] minor dims padded to 128 lanes
        assert m.argument_size_in_bytes <= 4 * expected_unpadded
    assert m.alias_size_in_bytes == 0  # nothing donated

    # Outputs.
    cfg = config_for(case)
    if case.mode == "forward":
        logits = case.batch_per_chip * case.seq * cfg.vocab_size * 4  # fp32 [B/n, S, V] per device
        assert m.output_size_in_bytes == tiled_bytes(r.out_avals, out_formats) == logits
    else:  # (loss, grads): gradients sharded like the parameters; a tuple adds a small index table
        tiled = tiled_bytes(r.out_avals, out_formats)
        assert 0 <= m.output_size_in_bytes - tiled <= 1024
        grads_tiled = tiled_bytes(r.out_avals[1:], out_formats[1:])
        assert grads_tiled == m.argument_size_in_bytes - tiled_bytes(r.in_avals[-2:], in_formats[-2:])

    # Scratch: the real model needs some (gathered weights, activations); everything fits the chip.
    if case.preset != "tiny":
        assert m.temp_size_in_bytes > 0
        assert m.generated_code_size_in_bytes > 0
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    assert total < HBM_GIB[r.device_kind] * 2**30


if __name__ == "__main__":  # other shapes, outside pytest: prints the same table
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default=",".join(TOPOLOGIES))
    p.add_argument("--preset", default="ernie-4.5-0.3b")
    p.add_argument("--mode", default="forward,train")
    p.add_argument("--batch-per-chip", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--remat", default="full", help="comma-separated remat policies (real presets only)")
    a = p.parse_args()
    if _MISSING:
        raise SystemExit(_MISSING)
    print(TABLE_HEADER, flush=True)
    for t in a.topology.split(","):
        for m in a.mode.split(","):
            for rp in a.remat.split(","):
                print(row(compile_case(Case(t, a.preset, m, a.batch_per_chip, a.seq, rp))), flush=True)
