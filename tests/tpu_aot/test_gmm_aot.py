"""TPU ahead-of-time compile tier for the grouped-matmul Pallas kernels (pallas_kernels.gmm), CPU-only host.

The real Mosaic lowering and TPU compiler run for virtual `v5p:2x2x1` and `v6e:2x2` slices (libtpu from
PyPI, no TPU): forward, and forward + backward (`jax.value_and_grad`: the gmm forward, the d lhs gmm and the
tgmm weight gradient), at ERNIE-4.5-21B-A3B expert shapes (hidden 2560, expert width 1536, 64 experts, bf16)
with the experts split over the 4 chips. A Mosaic kernel cannot be auto-partitioned, so it runs inside
`jax.shard_map` over the topology mesh (AxisType.Auto, explicit in/out shardings, varying-axes check on):
each chip holds 16 experts and runs only their rows (`group_offset` = 16 * axis_index); the token rows
are replicated and the partial outputs summed over the chips (ring-of-experts layout).

Every call leaves `interpret` at its default: the kernels choose Mosaic vs the Pallas interpreter when
lowering, so these compiles for TPU from a CPU host get the Mosaic kernels.

Checks: the compiled program is a TPU one with one Mosaic custom call per kernel (1 forward, 3 forward +
backward); `memory_analysis()` arguments / outputs are exactly the per-chip operand / result bytes; the
scratch is small next to them (no dense [G, M, K] expansion as in ragged_dot's fallback). The table of
numbers prints with `pytest tests/tpu_aot/test_gmm_aot.py -s`; docs/benchmarks.md quotes it.
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

from pallas_kernels.gmm import choose_tiling, gmm, tgmm  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402


_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

HBM_GIB = {"TPU v5": 95, "TPU v6 lite": 32}
MIB = 2**20
AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Case:
    topology: str
    mode: str  # "forward" | "train"
    rows: int = 4096  # M: token-slots (tokens x top-k), replicated on every chip
    hidden: int = 2560  # K (21B-A3B hidden_size)
    width: int = 1536  # N (21B-A3B moe_intermediate_size)
    experts: int = 64  # G, split over the chips
    dtype: str = "bfloat16"  # operands (accumulation is fp32 either way)

    @property
    def id(self) -> str:
        return f"{self.topology.replace(':', '-')}-{self.mode}-{self.dtype}"


CASES = [Case(t, m) for t in ("v5p:2x2x1", "v6e:2x2") for m in ("forward", "train")]
CASES.append(Case("v5p:2x2x1", "train", dtype="float32"))  # fp32 operands: multi-pass MXU, fp32 tiles


@functools.lru_cache(maxsize=None)
def topology_mesh(name: str) -> jax.sharding.Mesh:
    devices = virtual_tpu_devices(name)
    return jax.sharding.Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


def compile_case(c: Case):
    mesh = topology_mesh(c.topology)
    chips = mesh.size
    local = c.experts // chips
    rep, by_expert = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def local_out(lhs, rhs_local, sizes):
        off = jax.lax.axis_index(AXIS) * local
        # the default call (no `interpret`), as the MoE layer makes it: Mosaic because lowered for TPU
        return gmm(lhs, rhs_local, sizes, group_offset=off, preferred_element_type=jnp.float32)

    if c.mode == "forward":
        fn = jax.shard_map(lambda *a: jax.lax.psum(local_out(*a), AXIS), mesh=mesh,
                           in_specs=(P(), P(AXIS), P()), out_specs=P())
        jitted = jax.jit(fn, in_shardings=(rep, by_expert, rep), out_shardings=rep)
    else:
        def loss(lhs, rhs, sizes, ct):  # <out, ct>: its gradient is the gmm backward with cotangent ct
            part = jax.shard_map(lambda a, b, s, t: jax.lax.psum(jnp.sum(local_out(a, b, s) * t), AXIS),
                                 mesh=mesh, in_specs=(P(), P(AXIS), P(), P()), out_specs=P())
            return part(lhs, rhs, sizes, ct)

        jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(rep, by_expert, rep, rep),
                         out_shardings=(rep, (rep, by_expert)))
    args = [jax.ShapeDtypeStruct((c.rows, c.hidden), c.dtype),
            jax.ShapeDtypeStruct((c.experts, c.hidden, c.width), c.dtype),
            jax.ShapeDtypeStruct((c.experts,), jnp.int32)]
    if c.mode == "train":
        args.append(jax.ShapeDtypeStruct((c.rows, c.width), jnp.float32))
    t0 = time.perf_counter()
    with jax.default_matmul_precision(None):  # as in training (tests/conftest.py sets "highest")
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0, chips


def expected_bytes(c: Case, chips: int) -> tuple[int, int]:
    """(arguments, outputs) per chip, unpadded: every dim here is a multiple of the TPU tiles."""
    lhs = _nbytes((c.rows, c.hidden), c.dtype)
    rhs_local = _nbytes((c.experts // chips, c.hidden, c.width), c.dtype)
    sizes = _nbytes((c.experts,), jnp.int32)
    out = _nbytes((c.rows, c.width), jnp.float32)
    if c.mode == "forward":
        return lhs + rhs_local + sizes, out
    return lhs + rhs_local + sizes + out, 4 + lhs + rhs_local  # ct in; loss, d lhs, d rhs (local) out


TABLE_HEADER = ("| topology | mode | dtype | M x K x N, G (per chip) | tiles (tm, tk, tn) | compile s | kernels "
                "| argument MiB | output MiB | temp MiB | code MiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _ROWS:
        print(f"\n\nTPU AOT memory_analysis per chip, grouped matmul (jax {jax.__version__}):\n{TABLE_HEADER}\n"
              + "\n".join(_ROWS))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gmm_aot_compile(case: Case):
    compiled, secs, chips = compile_case(case)
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    kernels = hlo.count('custom_call_target="tpu_custom_call"')
    tiles = choose_tiling(case.rows, case.hidden, case.width, num_groups=case.experts // chips, dtype=case.dtype)
    row = (f"| {case.topology} | {case.mode} | {case.dtype} | {case.rows}x{case.hidden}x{case.width}, "
           f"{case.experts // chips} "
           f"| {tiles} | {secs:.1f} | {kernels} | {m.argument_size_in_bytes / MIB:.2f} "
           f"| {m.output_size_in_bytes / MIB:.2f} | {m.temp_size_in_bytes / MIB:.2f} "
           f"| {m.generated_code_size_in_bytes / MIB:.2f} |")
    _ROWS.append(row)
    print("\n" + row)

    assert compiled.input_formats is not None
    assert kernels == (1 if case.mode == "forward" else 3), hlo.count("custom_call")
    assert ":T(8,128)" in hlo or ":T(16,128)" in hlo  # TPU tiled layouts
    args, outs = expected_bytes(case, chips)
    assert args <= m.argument_size_in_bytes <= args + 4096  # (+ padding of the small group_sizes array)
    assert outs <= m.output_size_in_bytes <= outs + 4096  # (+ a tuple index table)
    # Scratch: the per-chip f32 partial output before the psum and the bf16/f32 copies around it, not a
    # dense per-expert expansion (that would be >= G_local * M * K * 2 bytes = 320 MiB here).
    assert m.temp_size_in_bytes <= 4 * _nbytes((case.rows, case.width), jnp.float32) + 16 * MIB
    kind = topology_mesh(case.topology).devices.flat[0].device_kind
    assert args + outs + m.temp_size_in_bytes < HBM_GIB[kind] * 2**30


def test_default_call_lowers_the_mosaic_kernel_from_a_cpu_host():
    """gmm and tgmm without `interpret`, jitted for one chip of a TPU topology on this CPU host: the program
    holds the Mosaic kernels (forward, d lhs, d rhs of gmm; tgmm), not the Pallas interpreter (no custom call),
    which a choice by `jax.default_backend()` ("cpu" here) at trace time would have lowered."""
    assert jax.default_backend() == "cpu"
    chip = jax.sharding.SingleDeviceSharding(virtual_tpu_devices("v6e:2x2")[0])  # Mosaic is not partitioned
    m, k, n, g = 512, 256, 256, 8

    def f(lhs, rhs, sizes, ct):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, preferred_element_type=jnp.float32), lhs, rhs)
        return out, vjp(ct), tgmm(lhs.T, ct, sizes)

    args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, n), jnp.float32)]
    with jax.default_matmul_precision(None):  # as in training (tests/conftest.py sets "highest")
        lowered = jax.jit(f, in_shardings=chip, out_shardings=chip).lower(*args)
        stablehlo = lowered.as_text()
        assert stablehlo.count("@tpu_custom_call") == 4, stablehlo.count("custom_call")
        compiled = lowered.compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 4


if __name__ == "__main__":
    if _MISSING:
        raise SystemExit(_MISSING)
    print(TABLE_HEADER)
    for c in CASES:
        compiled, secs, chips = compile_case(c)
        m = compiled.memory_analysis()
        print(f"| {c.topology} | {c.mode} | {c.dtype} | {secs:.1f} s | arg {m.argument_size_in_bytes / MIB:.2f} | "
              f"out {m.output_size_in_bytes / MIB:.2f} | temp {m.temp_size_in_bytes / MIB:.2f} MiB |", flush=True)
