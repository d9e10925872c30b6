"""Grouped-matmul throughput at MoE expert shapes: our Pallas kernel vs `jax.lax.ragged_dot` vs jax's megablox.

    python -m experiments.bench.gmm [--repeats 5] [--out docs/benchmarks.md]

Whatever backend jax has:
- TPU: the kernels compiled by Mosaic (ours and megablox) vs ragged_dot (XLA's native ragged dot).
- CPU: the Pallas kernels can only run in *interpret mode* (a JAX loop over the grid, slow per grid step),
  so their rows measure the interpreter, not the kernel; ragged_dot on CPU is XLA's dense fallback (every
  row times every expert). Shapes are the 21B-A3B expert shapes scaled down to fit 2 cores.
- GPU: the Pallas kernels are TPU (Mosaic) kernels and do not run there; the rows are ragged_dot's two GPU
  lowerings (XLA's default and jax's Pallas-Triton one) and one dense matmul of the same useful FLOPs
  (M x K x N, a single expert: the ceiling a grouped matmul can approach).

Rows: forward (out = gmm(x, w)) and forward + backward (value_and_grad of <out, ct> w.r.t. x and w: the
forward plus d x and d w, 3x the FLOPs). TFLOP/s counts the useful FLOPs (2*M*K*N per matmul), so
padding, masked rows and a dense fallback's extra work show up as lower throughput. Group sizes are a
skewed random routing (multinomial over a Dirichlet(2) expert popularity). Median of --repeats calls after
a warm-up, implementations taking turns; compile time apart. Each backend rewrites only its own `### `
block of the `## Grouped matmul` section of --out, so CPU, TPU and GPU runs can live side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import os
import platform
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## Grouped matmul (experiments/bench/gmm.py)"


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    top_k: int
    k: int  # contracting dim (hidden for the gate/up projection, expert width for the down projection)
    n: int
    groups: int
    dtype: str
    passes: tuple[str, ...] = ("forward", "fwd+bwd")

    @property
    def m(self) -> int:
        return self.tokens * self.top_k


# ERNIE-4.5-21B-A3B: hidden 2560, expert width 1536, 64 experts, top-6.
SHAPES = {
    "cpu": [Shape("21B-A3B up-proj / 4 (K, N, experts)", 256, 6, 640, 384, 16, "float32"),
            Shape("21B-A3B down-proj / 4 (K, N, experts)", 256, 6, 384, 640, 16, "float32")],
    "tpu": [Shape("21B-A3B up-proj", 4096, 6, 2560, 1536, 64, "bfloat16"),
            Shape("21B-A3B down-proj", 4096, 6, 1536, 2560, 64, "bfloat16")],
    "gpu": [Shape("21B-A3B up-proj", 4096, 6, 2560, 1536, 64, "bfloat16"),
            Shape("21B-A3B down-proj", 4096, 6, 1536, 2560, 64, "bfloat16"),
            # ragged_dot's fwd+bwd needs > 127 GiB here (OOM on an H200): forward only
            Shape("21B-A3B up-proj, 16k tokens", 16384, 6, 2560, 1536, 64, "bfloat16", ("forward",))],
}


def group_sizes_for(s: Shape, seed: int = 0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    return rs.multinomial(s.m, rs.dirichlet(2.0 * np.ones(s.groups))).astype(np.int32)


def implementations(backend: str, s: Shape) -> dict:
    """name -> f(lhs, rhs, group_sizes) -> [M, N] fp32, for this backend."""
    impls = {}
    if backend in ("cpu", "tpu"):
        from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm  # the custom_vjp op

        from pallas_kernels.gmm import choose_tiling, gmm

        interpret = backend != "tpu"
        tiles = choose_tiling(s.m, s.k, s.n, num_groups=s.groups, dtype=s.dtype, interpret=interpret)
        label = "interpret" if interpret else "Mosaic"
        impls[f"ours, Pallas ({label}), tiles {tiles}"] = functools.partial(
            gmm, preferred_element_type=jnp.float32, tiling=tiles, interpret=interpret)
        # megablox needs M % tm == 0; same tiles as ours (interpret: whole K and N, so few grid steps)
        mb_tiles = tiles if s.m % tiles[0] == 0 else (128, *tiles[1:])
        impls[f"megablox gmm ({label}), tiles {mb_tiles}"] = (
            lambda x, w, gs, t=mb_tiles: megablox_gmm(x, w, gs, jnp.float32, t, None, None, False, interpret))
    impls[RAGGED + (" (XLA dense fallback)" if backend == "cpu" else " (XLA)")] = (
        lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32))
    if backend == "gpu" and importlib.util.find_spec("jax._src.lax.pallas_lowerings") is not None:
        impls[TRITON] = impls[RAGGED + " (XLA)"]  # the same call, lowered with the flag below
    if backend in ("cpu", "gpu"):
        try:  # the MoE layer's pure-JAX path (its CPU default): groups padded to row tiles, one batched matmul
            from ernie_jax.model.grouped_matmul import grouped_matmul
            impls["ernie_jax `tiled` (pure JAX, padded batched matmul)"] = functools.partial(grouped_matmul,
                                                                                             impl="tiled")
        except ImportError as e:
            print(f"ernie_jax's tiled grouped matmul not importable here: {e}")
    if backend == "gpu":
        impls["dense matmul, same FLOPs (ceiling)"] = (  # one expert for all rows
            lambda x, w, gs: jnp.dot(x, w[0], preferred_element_type=jnp.float32))
    return impls


RAGGED = "ragged_dot"
TRITON = "ragged_dot (jax Pallas-Triton lowering)"


def _lowering_flags(name: str):
    """ragged_dot's GPU lowering is chosen when lowering (the flag is part of the jit cache key)."""
    if name != TRITON:
        return contextlib.nullcontext()
    from jax._src import config as jax_config  # a State is its own context manager; no public spelling
    return jax_config.jax_ragged_dot_use_gpu_pallas_triton_lowering(True)


def _train(fn):
    def loss(x, w, gs, ct):
        return jnp.vdot(fn(x, w, gs).astype(jnp.float32), ct)
    return jax.value_and_grad(loss, argnums=(0, 1))


def bench_shape(backend: str, s: Shape, repeats: int, check: bool) -> list[dict]:
    rs = np.random.RandomState(1)
    dt = jnp.dtype(s.dtype)
    x = jnp.asarray(rs.randn(s.m, s.k) / np.sqrt(s.k), dt)
    w = jnp.asarray(rs.randn(s.groups, s.k, s.n), dt)
    gs = jnp.asarray(group_sizes_for(s))
    ct = jnp.asarray(rs.randn(s.m, s.n) / np.sqrt(s.n), jnp.float32)
    rows, runs = [], {}
    for name, fn in implementations(backend, s).items():
        for mode, f, args, flop_mult in (("forward", fn, (x, w, gs), 2), ("fwd+bwd", _train(fn), (x, w, gs, ct), 6)):
            if mode not in s.passes:
                continue
            jitted = jax.jit(f)
            t0 = time.perf_counter()
            try:
                with _lowering_flags(name):
                    compiled = jitted.lower(*args).compile()
                out = jax.block_until_ready(compiled(*args))  # warm-up
            except Exception as e:  # noqa: BLE001  (a lowering missing on this backend: report, go on)
                print(f"[{s.name}] {name} {mode}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            runs[(name, mode)] = (compiled, args, time.perf_counter() - t0, flop_mult, out)
    if check:  # every implementation computes the same thing (dense: a different product, skipped)
        for mode in ("forward", "fwd+bwd"):
            got = {k[0]: v[4] for k, v in runs.items() if k[1] == mode and not k[0].startswith("dense")}
            ref = next((v for k, v in got.items() if k.startswith(RAGGED)), None)
            if ref is None:
                continue
            for k, v in got.items():
                a, b = jax.tree.leaves(v), jax.tree.leaves(ref)
                err = max(float(jnp.max(jnp.abs(p.astype(jnp.float32) - q.astype(jnp.float32))) /
                                max(1.0, float(jnp.max(jnp.abs(q.astype(jnp.float32)))))) for p, q in zip(a, b))
                print(f"[{s.name}] {mode} {k}: max rel. diff vs ragged_dot {err:.1e}")
    times = {key: [] for key in runs}
    for _ in range(repeats):  # round-robin: background load hits every implementation alike
        for key, (compiled, args, *_rest) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[key].append(time.perf_counter() - t0)
    base = {mode: statistics.median(times[(name, mode)]) for name, mode in runs
            if name.startswith(RAGGED) and name != TRITON}  # XLA's ragged_dot: the ratio's reference
    for (name, mode), (_c, _a, compile_s, mult, _o) in runs.items():
        med = statistics.median(times[(name, mode)])
        rows.append(dict(shape=s, impl=name, mode=mode, compile_s=compile_s, ms=1e3 * med,
                         tflops=mult * s.m * s.k * s.n / med / 1e12,
                         ratio=base[mode] / med if mode in base else float("nan")))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | M x K x N, G | dtype | impl | pass | compile s | median ms | TFLOP/s | speed vs ragged_dot |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["shape"]
        lines.append(f"| {s.name} | {s.m}x{s.k}x{s.n}, {s.groups} | {s.dtype} | {r['impl']} | {r['mode']} "
                     f"| {r['compile_s']:.2f} | {r['ms']:.2f} | {r['tflops']:.3g} | "
                     + ("–" if np.isnan(r["ratio"]) else f"{r['ratio']:.2f}x") + " |")
    return "\n".join(lines)


def backend_label(backend: str) -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    if backend == "cpu":
        return f"### CPU ({os.cpu_count()} cores): Pallas kernels in interpret mode"
    if backend == "gpu":
        return f"### GPU ({kind}): ragged_dot only (the Pallas kernels are TPU kernels)"
    return f"### TPU ({kind}, {len(devices)} chips): compiled kernels"


def block(backend: str, args, rows: list[dict], load: tuple[float, float]) -> str:
    s0 = SHAPES[backend][0]
    sizes = group_sizes_for(s0)
    notes = {
        "cpu": "Interpret-mode rows measure jax's Pallas interpreter (a loop over grid steps), not a TPU "
               "kernel: they only say that the tiling keeps the step count low. ragged_dot here is XLA's "
               "dense fallback, which multiplies every row by every expert (G times the useful FLOPs).",
        "gpu": "Our kernel and megablox are Mosaic (TPU) kernels and do not run on a GPU; the MoE layer's "
               "GPU path is ragged_dot (`moe_gmm_impl=\"ragged_dot\"`, also what `auto` picks), measured here at "
               "the real expert shapes, beside the layer's pure-JAX `tiled` path and a dense matmul of the same "
               "useful FLOPs. (jax's Pallas-Triton lowering of ragged_dot is listed only where this jax has it.)",
        "tpu": "Both Pallas kernels compiled by Mosaic; ragged_dot is XLA's native TPU ragged dot.",
    }[backend]
    return (f"{backend_label(backend)}\n\n{notes}\n\n"
            f"- measured: {utc_now()}, commit `{git_rev()}`, `python -m experiments.bench.gmm --repeats "
            f"{args.repeats}`; median of {args.repeats} calls\n"
            f"- machine: `{platform.platform()}`, {os.cpu_count()} CPUs, jax {jax.__version__} backend "
            f"`{jax.default_backend()}`; 1-min load average {load[0]:.2f} before / {load[1]:.2f} after\n"
            f"- group sizes of the first shape: min {sizes.min()}, max {sizes.max()}, mean {sizes.mean():.0f}, "
            f"{int((sizes == 0).sum())} empty\n\n{table(rows)}\n")


PREAMBLE = (
    "Throughput of the MoE expert grouped matmul (`out[rows of expert g] = x[rows] @ w[g]`), our Pallas kernel "
    "(`pallas_kernels.gmm`) vs `jax.lax.ragged_dot` vs jax's megablox `gmm`, forward and forward + backward. "
    "TFLOP/s counts useful FLOPs (2*M*K*N per matmul, x3 with the backward); \"speed vs ragged_dot\" is "
    "ragged_dot's median time over the row's. Each backend's block is rewritten only by a run on that "
    "backend. TPU memory numbers (AOT compile, v5p / v6e): `pytest tests/tpu_aot/test_gmm_aot.py -s`.")


def existing_blocks(path: Path) -> dict[str, str]:
    """The `### ` blocks of this script's section in path (to keep other backends' results)."""
    if not path.exists():
        return {}
    text = path.read_text()
    start = text.find(SECTION)
    if start < 0:
        return {}
    body = text[start + len(SECTION):]
    nxt = re.search(r"(?m)^## ", body)
    body = body[:nxt.start()] if nxt else body
    return {b.split("\n", 1)[0]: b.rstrip("\n") + "\n" for b in re.split(r"(?m)^(?=### )", body)
            if b.startswith("### ")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="", help="comma-separated indices into this backend's shape list")
    p.add_argument("--no-check", action="store_true", help="skip the cross-implementation value check")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()

    backend = jax.default_backend()
    backend = "gpu" if backend in ("gpu", "cuda", "rocm") else backend
    shapes = SHAPES[backend]
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    load_before = os.getloadavg()[0]
    rows = []
    for s in shapes:
        rows += bench_shape(backend, s, args.repeats, check=not args.no_check)
        print(table([r for r in rows if r["shape"] == s]), flush=True)
    new = block(backend, args, rows, (load_before, os.getloadavg()[0]))
    mine = f"### {backend.upper()} "
    blocks = {k: v for k, v in existing_blocks(args.out).items() if not k.startswith(mine)}
    blocks[new.split("\n", 1)[0]] = new
    order = sorted(blocks, key=lambda t: ("CPU" not in t, "TPU" not in t, t))
    write_section(args.out, SECTION, PREAMBLE + "\n\n" + "\n".join(blocks[t] for t in order).rstrip("\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
