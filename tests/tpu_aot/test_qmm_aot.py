"""TPU ahead-of-time compile tier for the quantized matmul Pallas kernels (pallas_kernels.qmm), CPU-only host.

The real Mosaic lowering and TPU compiler run for one chip of virtual `v5p:2x2x1` and `v6e:2x2` slices (libtpu
from PyPI, no TPU): `quantized_matmul` weight-only (bf16 x, int4 weights in groups of 128) and W8A8 (per-token
int8 x, per-channel int8 weights), and `quantized_gmm` over 8 experts (weight-only int4 g128, and W4A8 with
asymmetric int4 g128 weights), at ERNIE-4.5-21B-A3B-like widths (hidden 2560, expert width 1536).

Every call leaves `interpret` at its default: the kernels choose Mosaic vs the Pallas interpreter when
lowering, so these compiles for TPU from a CPU host get the Mosaic kernels.

Checks: one Mosaic custom call per program; `memory_analysis()` arguments are the packed codes, scales (and
zeros), x (and group sizes), i.e. no dequantized weight crosses HBM; the scratch holds at most x's int8 copy
and small buffers, never a dequantized [K, N] weight. The table prints with
`pytest tests/tpu_aot/test_qmm_aot.py -s`.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see test_model_aot.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pallas_kernels.qmm import choose_tiling, quantized_gmm, quantized_matmul  # noqa: E402
from pallas_kernels.qmm.format import QuantizedTensor  # noqa: E402
from tpu_topology import libtpu_missing, virtual_tpu_devices  # noqa: E402

_MISSING = libtpu_missing()
pytestmark = [pytest.mark.tpu_aot, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Case:
    topology: str
    op: str  # "qmm" | "qgmm"
    bits: int
    group_size: int | None  # None: per channel
    activation_bits: int | None
    symmetric: bool = True
    rows: int = 512  # M
    hidden: int = 2560  # K
    width: int = 1536  # N
    experts: int = 8  # G (qgmm)

    @property
    def g(self) -> int:
        return self.hidden if self.group_size is None else self.group_size

    @property
    def id(self) -> str:
        w = f"w{self.bits}{'' if self.symmetric else 'asym'}" + (f"g{self.group_size}" if self.group_size else "pc")
        a = f"a{self.activation_bits}" if self.activation_bits else "a16"
        return f"{self.topology.replace(':', '-')}-{self.op}-{w}{a}"


CASES = [c for t in ("v5p:2x2x1", "v6e:2x2") for c in (
    Case(t, "qmm", 4, 128, None),  # weight-only int4, groups of 128
    Case(t, "qmm", 8, None, 8),  # W8A8, per-channel int8 weights
    Case(t, "qgmm", 4, 128, None, rows=2048),
    Case(t, "qgmm", 4, 128, 8, symmetric=False, rows=2048),  # W4A8, asymmetric weights
)]


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def weight_struct(c: Case) -> QuantizedTensor:
    lead = (c.experts,) if c.op == "qgmm" else ()
    k, n, kg = c.hidden, c.width, c.hidden // c.g
    return QuantizedTensor(codes=_struct((*lead, k * c.bits // 8, n), jnp.uint8),
                           scales=_struct((*lead, kg, n), jnp.float32),
                           zeros=None if c.symmetric else _struct((*lead, kg, n), jnp.float32),
                           bits=c.bits, group_size=c.g, shape=(k, n))


def compile_case(c: Case):
    chip = jax.sharding.SingleDeviceSharding(virtual_tpu_devices(c.topology)[0])  # Mosaic is not partitioned
    x = _struct((c.rows, c.hidden), jnp.bfloat16)
    w = weight_struct(c)
    if c.op == "qmm":
        fn, args = (lambda x, w: quantized_matmul(x, w, activation_bits=c.activation_bits)), (x, w)
    else:
        fn = lambda x, w, s: quantized_gmm(x, w, s, activation_bits=c.activation_bits)  # noqa: E731
        args = (x, w, _struct((c.experts,), jnp.int32))
    t0 = time.perf_counter()
    with jax.default_matmul_precision(None):  # as in serving (tests/conftest.py sets "highest")
        lowered = jax.jit(fn, in_shardings=chip, out_shardings=chip).lower(*args)
        stablehlo = lowered.as_text()
        compiled = lowered.compile()
    return stablehlo, compiled, time.perf_counter() - t0


def argument_bytes(c: Case) -> int:
    """x, codes, scales, zeros (and group sizes), unpadded."""
    leaves = [c.rows * c.hidden * 2] + [int(np.prod(a.shape)) * a.dtype.itemsize
                                        for a in jax.tree.leaves(weight_struct(c))]
    return sum(leaves) + (4 * c.experts if c.op == "qgmm" else 0)


TABLE_HEADER = ("| topology | op | weights | activations | M x K x N (G) | tiles (tm, tk, tn) | compile s "
                "| argument MiB | output MiB | temp MiB | code MiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
_ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if _ROWS:
        print(f"\n\nTPU AOT memory_analysis, one chip, quantized matmul (jax {jax.__version__}):\n{TABLE_HEADER}\n"
              + "\n".join(_ROWS))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_qmm_aot_compile(case: Case):
    stablehlo, compiled, secs = compile_case(case)
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    tiles = choose_tiling(case.rows, case.hidden, case.width, bits=case.bits, group_size=case.g,
                          activation_bits=case.activation_bits, num_groups=case.experts if case.op == "qgmm" else 1)
    weights = (f"int{case.bits} {'sym' if case.symmetric else 'asym'} "
               + (f"g{case.group_size}" if case.group_size else "per-channel"))
    shape = f"{case.rows}x{case.hidden}x{case.width}" + (f" ({case.experts})" if case.op == "qgmm" else "")
    row = (f"| {case.topology} | {case.op} | {weights} | {'int8' if case.activation_bits else 'bf16'} | {shape} "
           f"| {tiles} | {secs:.1f} | {m.argument_size_in_bytes / MIB:.2f} | {m.output_size_in_bytes / MIB:.2f} "
           f"| {m.temp_size_in_bytes / MIB:.2f} | {m.generated_code_size_in_bytes / MIB:.2f} |")
    _ROWS.append(row)
    print("\n" + row)

    assert stablehlo.count("@tpu_custom_call") == 1, stablehlo.count("custom_call")  # Mosaic, not interpreted
    assert hlo.count('custom_call_target="tpu_custom_call"') == 1
    args = argument_bytes(case)
    # (+ TPU tile padding of the [K / g, N] scales: K / g rows round up to 8)
    assert args <= m.argument_size_in_bytes <= args + 2 * case.experts * 8 * case.width * 4 + 4096
    assert m.output_size_in_bytes == case.rows * case.width * 2  # bf16 out
    dense_weight = (case.experts if case.op == "qgmm" else 1) * case.hidden * case.width * 2  # as bf16
    assert m.temp_size_in_bytes <= case.rows * case.hidden + 4 * MIB < dense_weight  # no dequantized weight


if __name__ == "__main__":
    if _MISSING:
        raise SystemExit(_MISSING)
    print(TABLE_HEADER)
    for c in CASES:
        _, compiled, secs = compile_case(c)
        m = compiled.memory_analysis()
        print(f"| {c.id} | {secs:.1f} s | arg {m.argument_size_in_bytes / MIB:.2f} | "
              f"out {m.output_size_in_bytes / MIB:.2f} | temp {m.temp_size_in_bytes / MIB:.2f} MiB |", flush=True)
