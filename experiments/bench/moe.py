"""MoE scaling on the host: step time of one MoE block at 8..64 experts with the same active parameters.

    python -m experiments.bench.moe [--experts 8,16,32,64] [--batch 4] [--seq 2048,1024,256] [--hidden 256]
                                    [--width 256] [--k 4] [--repeats 15] [--impls ...] [--slow-max-tokens 1024]

One step is the jitted `jax.value_and_grad` of `mean(y**2)` w.r.t. the `nnx.Param`s of one
`ernie_jax.model.moe.MoEBlock` (router + routed SwiGLU experts, no shared expert) and its input x, y the block's
output: a layer's backward in a training step, which also hands dx to the layers below (the experts' dx matmuls are
E-sensitive too; without dx, XLA drops them and the ratios come out lower). Top-k, the expert width
and the hidden size stay fixed, so every E has the same active parameters and FLOPs per token; only the number of
experts (total parameters) grows. Each `--seq` value is its own group of rows (batch x seq tokens), timed on its
own. Dispatch paths: dropless with the `bucketed` grouped matmul (the CPU default; the experts' SwiGLU fused on one
layout, `grouped_matmul.expert_swiglu`) and with `tiled`, the no-dispatch floor (`floor_output`: equal loads by
construction, no sort or gathers, the bound for any dispatch), and, in the row groups of at most
`--slow-max-tokens` tokens only (`SLOW`), dropless with `jax.lax.ragged_dot` (a dense fallback on CPU) and the
dense "every expert on every token" einsum, whose cost grows with E by construction, and GShard capacity dispatch,
whose one-hot dispatch grows with tokens^2. With `--impls`, also `dropless bucketed 3-call` (bucketed unfused: three
`grouped_matmul` calls, each building its own layout). For each E all paths see the same weights and inputs; the
dropless paths (and `dense` where run) must agree before anything is timed. Besides wall time, the CPU time of the
process over each step (user + kernel; the kernel part is mostly page faults on buffers XLA maps afresh each step).
Each token count also times XLA's batched matmul alone (`matmul_probe`), the floor's per-expert matmul at equal
FLOPs, wall and CPU time: with few rows per expert it runs slower and on fewer cores at E = 64, which no dispatch
can avoid. Peak memory is XLA's buffer estimate from the compiled executable's `memory_analysis()` (temp + argument
+ output bytes), not a measured RSS. The Markdown table is printed and written as the `## MoE scaling` section of
`--out`; other sections are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import resource
import statistics
import time
import unittest.mock
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ernie_jax
from ernie_jax.model import moe as moe_module
from ernie_jax.model.grouped_matmul import expert_swiglu
from ernie_jax.model.grouped_matmul.bucketed import bucket_branch, bucket_branches
from ernie_jax.model.mlp import ACTIVATIONS
from ernie_jax.model.moe import MoEBlock, router_stats
from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## MoE scaling (experiments/bench/moe.py)"
# label -> ErnieConfig fields
IMPLS = {
    "dropless bucketed": dict(moe_dispatch="dropless", moe_gmm_impl="bucketed"),
    "dropless bucketed 3-call": dict(moe_dispatch="dropless", moe_gmm_impl="bucketed"),  # see `UNFUSED`
    "dropless tiled": dict(moe_dispatch="dropless", moe_gmm_impl="tiled"),
    "dropless ragged_dot": dict(moe_dispatch="dropless", moe_gmm_impl="ragged_dot"),
    "capacity": dict(moe_dispatch="capacity"),
    "dense": dict(moe_dispatch="dense"),
    "no-dispatch floor": dict(moe_dispatch="dropless"),  # see `floor_output`
}
FLOOR = "no-dispatch floor"
UNFUSED = "dropless bucketed 3-call"  # bucketed without the fused expert SwiGLU: three grouped_matmul calls
DEFAULT_IMPL = "dropless bucketed"  # the CPU default (`moe_gmm_impl="auto"`)
DEFAULT_IMPLS = [i for i in IMPLS if i != UNFUSED]
SLOW = ("dropless ragged_dot", "capacity", "dense")  # seconds a step at 4096 tokens: only up to --slow-max-tokens
GOAL = 1.2  # the goal: step(E=64) / step(E=8) of the default path
RTOL = 1e-4
jax.config.update("jax_platforms", "cpu")


def floor_output(block: MoEBlock, x: jax.Array):
    """The block without dispatch: the router and its statistics as in `MoEBlock`, then token-slot s goes to
    expert s * E // (T * k) (perfectly balanced, no sort, no gather): the experts' batched SwiGLU
    [E, T * k / E, H] and the weighted combine. The same FLOPs as a dropless step with equal loads; what it
    costs more at E = 64 than at E = 8 no dispatch can save (the weights and their gradients grow with E)."""
    b, s, h = x.shape
    xt = x.reshape(b * s, h)
    r = block.router(xt)
    t, k = r.expert_ids.shape
    wg, wu, wo = block.experts.weights(xt.dtype)
    xs = jnp.repeat(xt, k, axis=0).reshape(wg.shape[0], -1, h)
    hid = ACTIVATIONS[block.experts.act](jnp.einsum("ECH,EHI->ECI", xs, wg)) * jnp.einsum("ECH,EHI->ECI", xs, wu)
    ys = jnp.einsum("ECI,EIH->ECH", hid, wo).reshape(t, k, h)
    return jnp.einsum("TKH,TK->TH", ys, r.weights.astype(ys.dtype)).reshape(b, s, h), router_stats(r, None)


def timed_call(f, *a) -> tuple[float, float, float]:
    """(wall s, CPU s of this process: user + kernel, all threads, and its kernel part) of one call of f, right
    after an untimed one of the same executable."""
    jax.block_until_ready(f(*a))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(f(*a))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, r1.ru_stime - r0.ru_stime


def matmul_probe(args, seq: int) -> dict[int, tuple[float, float]]:
    """E -> (median wall ms, median CPU ms) of one bare forward einsum [E, T*k/E, H] x [E, H, I] (fp32, the
    floor's per-expert matmul shape): how XLA's batched matmul alone scales with E at these FLOPs. Timed in
    rounds over E in a fresh random order, each call after an untimed one, as the steps are."""
    slots = args.batch * seq * args.k
    fns = {}
    for e in args.experts:
        x = jax.random.normal(jax.random.key(2), (e, slots // e, args.hidden), jnp.float32)
        w = jax.random.normal(jax.random.key(3), (e, args.hidden, args.width), jnp.float32)
        fns[e] = (jax.jit(lambda a, b: jnp.einsum("ECH,EHI->ECI", a, b)).lower(x, w).compile(), x, w)
    wall: dict[int, list[float]] = {e: [] for e in fns}
    cpu: dict[int, list[float]] = {e: [] for e in fns}
    rng = np.random.default_rng(1)
    for _ in range(args.repeats):
        for e in map(int, rng.permutation(list(fns))):
            w_s, c_s, _ = timed_call(*fns[e])
            wall[e].append(w_s)
            cpu[e].append(c_s)
    return {e: (1e3 * statistics.median(wall[e]), 1e3 * statistics.median(cpu[e])) for e in fns}


def build(args, seq: int, e: int, impl: str):
    """A compiled step for E experts and one dispatch path, its inputs and XLA's memory estimate."""
    cfg = ernie_jax.get_preset("tiny", hidden_size=args.hidden, moe_num_experts=e, moe_k=args.k,
                               moe_intermediate_size=(args.width,), moe_num_shared_experts=0,
                               moe_capacity_factor=args.capacity_factor, **IMPLS[impl])
    block = MoEBlock(cfg, rngs=nnx.Rngs(0))  # same seed: the same weights for every path
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def loss(p, x):
        block = nnx.merge(graphdef, p, rest)
        y, stats = floor_output(block, x) if impl == FLOOR else block(x)
        return jnp.mean(y.astype(jnp.float32) ** 2), stats

    x = jax.random.normal(jax.random.key(1), (args.batch, seq, args.hidden), jnp.float32)
    t0 = time.perf_counter()
    with unittest.mock.patch.object(moe_module, "expert_swiglu", functools.partial(expert_swiglu, fused=False)) \
            if impl == UNFUSED else contextlib.nullcontext():  # traced inside lower()
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    return step, params, x, compile_s, peak


def check_agree(e: int, outs: dict) -> None:
    """Dropless paths (and the dense oracle) compute the same loss and gradients (capacity may drop slots, the
    floor routes by position)."""
    names = [n for n in outs if n not in ("capacity", FLOOR)]
    ref = jax.tree.leaves((outs[names[0]][0][0], outs[names[0]][1]))
    for n in names[1:]:
        got = jax.tree.leaves((outs[n][0][0], outs[n][1]))
        err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(got, ref))
        if err > RTOL:  # otherwise the timings would compare different computations
            raise SystemExit(f"E={e}: {n} differs from {names[0]} by {err:.2e} (relative) > {RTOL:g}")


def impls_at(args, tokens: int) -> list[str]:
    """The paths timed at this token count: `SLOW` ones only up to --slow-max-tokens."""
    return [i for i in args.impls if i not in SLOW or tokens <= args.slow_max_tokens]


def run(args, seq: int) -> tuple[list[dict], dict, dict]:
    """One row group: every (E, impl) at `args.batch` x `seq` tokens."""
    tokens = args.batch * seq
    steps, rows, routing = {}, [], {}
    for e in args.experts:
        outs = {}
        for impl in impls_at(args, tokens):
            step, params, x, compile_s, peak = build(args, seq, e, impl)
            outs[impl] = jax.block_until_ready(step(params, x))  # also the warm-up call
            steps[(e, impl)] = (step, params, x)
            rows.append(dict(tokens=tokens, e=e, impl=impl, compile_s=compile_s, peak=peak))
            print(f"compiled {tokens} tokens E={e} {impl} in {compile_s:.2f} s", flush=True)
        if len([n for n in outs if n not in ("capacity", FLOOR)]) > 1:
            check_agree(e, outs)
        usage = np.asarray(next(iter(outs.values()))[0][1].usage)  # slots per expert, equal for every path
        cap = max(1, math.ceil(args.capacity_factor * tokens * args.k / e))
        routing[e] = dict(max_mean=float(usage.max() / usage.mean()), min_mean=float(usage.min() / usage.mean()),
                          dropped=float(np.maximum(usage - cap, 0).sum() / usage.sum()), cap=cap)
        # `bucketed` computes E * c + n * t rows, (c, n, t) the branch it picks for these loads (else the fallback)
        branches = bucket_branches(tokens * args.k, e)
        i = int(bucket_branch(jnp.asarray(usage, jnp.int32), branches))
        routing[e]["bucket_rows"] = ((e * branches[i][0] + branches[i][1] * branches[i][2]) / (tokens * args.k),
                                     branches[i]) if i < len(branches) else None

    # Rounds over every (E, path) in a fresh random order each, so that a change in background load hits all
    # of them alike. Each timed step follows an untimed one of the same executable (as in a training loop),
    # not the previous path's, whose large buffers would otherwise leave it cold caches and fresh pages.
    # CPU time of this process over the step (all its threads; user + kernel): unlike wall time it leaves out
    # the time other processes hold the cores, and the kernel part is mostly page faults on the buffers XLA
    # maps afresh each step (the temporaries, the returned gradients)
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    cpu: dict[tuple, list[tuple[float, float]]] = {key: [] for key in steps}
    keys, rng = list(steps), np.random.default_rng(0)
    for _ in range(args.repeats):
        for i in rng.permutation(len(keys)):
            wall, used, kernel = timed_call(*steps[keys[i]])
            times[keys[i]].append(wall)
            cpu[keys[i]].append((used, kernel))
    for r in rows:
        t, c = times[(r["e"], r["impl"])], cpu[(r["e"], r["impl"])]
        r.update(ms=1e3 * statistics.median(t), best_ms=1e3 * min(t))
        r.update(cpu_ms=1e3 * statistics.median(u for u, _ in c), sys_ms=1e3 * statistics.median(k for _, k in c))
        r["tok_s"] = tokens / (r["ms"] / 1e3)
    for r in rows:
        base = next((b for b in rows if b["impl"] == r["impl"] and b["e"] == min(args.experts)), r)
        r["ratio"], r["ratio_best"] = r["ms"] / base["ms"], r["best_ms"] / base["best_ms"]
        # paired: the median over rounds of (this step / the E0 step of the same round), which cancels load
        # that drifts between rounds (on a shared host the min of one row can come from a quiet moment alone)
        pairs = zip(times[(r["e"], r["impl"])], times[(base["e"], base["impl"])])
        r["ratio_paired"] = statistics.median(a / b for a, b in pairs)
        pairs = zip(cpu[(r["e"], r["impl"])], cpu[(base["e"], base["impl"])])
        r["ratio_cpu"] = statistics.median(a[0] / b[0] for a, b in pairs)
    return rows, routing, matmul_probe(args, seq)


def table(rows: list[dict], e0: int) -> str:
    lines = [f"| tokens | E | impl | median ms | min ms | tokens/s | ratio to E={e0} (median / min / paired) "
             f"| CPU ms (kernel) | CPU ratio (paired) | peak MiB | compile s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (-r["tokens"], list(IMPLS).index(r["impl"]), r["e"])):
        lines.append(f"| {r['tokens']} | {r['e']} | {r['impl']} | {r['ms']:.1f} | {r['best_ms']:.1f} "
                     f"| {r['tok_s']:,.0f} "
                     f"| {r['ratio']:.2f}× / {r['ratio_best']:.2f}× / {r['ratio_paired']:.2f}× "
                     f"| {r['cpu_ms']:.0f} ({r['sys_ms']:.0f}) | {r['ratio_cpu']:.2f}× "
                     f"| {r['peak'] / 2**20:.1f} "
                     f"| {r['compile_s']:.2f} |")
    return "\n".join(lines)


def group_lines(args, seq: int, rows: list[dict], routing: dict, probe: dict) -> str:
    """Shape, routing, batched-matmul probe and goal lines of one row group."""
    e0, e1 = min(args.experts), max(args.experts)
    tokens = args.batch * seq
    load_txt = ", ".join(f"E={e} {v['max_mean']:.2f} / {v['min_mean']:.2f}" for e, v in routing.items())
    drop_txt = ", ".join(f"E={e} {100 * v['dropped']:.1f}% (C={v['cap']})" for e, v in routing.items())
    rows_txt = ", ".join(f"E={e} " + (f"{v['bucket_rows'][0]:.2f}× {v['bucket_rows'][1]}" if v["bucket_rows"]
                                      else "fallback") for e, v in routing.items())
    out = (f"- **{tokens} tokens**: x [{args.batch}, {seq}, {args.hidden}] fp32 ({tokens * args.k} token-slots); "
           f"expert load max / min over mean slots per expert: {load_txt}; slots dropped by `capacity`: "
           f"{drop_txt}; rows `bucketed` computes (E × c + n × t over the slots, for the branch (c, n, t) of "
           f"buckets of c rows and n overflow tiles of t rows it picks): {rows_txt}\n")
    e0_ms = probe[e0][0]
    probe_txt = ", ".join(f"E={e} {w:.1f} ms wall / {c:.1f} ms CPU ({c / w:.1f} cores busy, {w / e0_ms:.2f}×)"
                          for e, (w, c) in probe.items())
    out += (f"  - XLA's batched matmul alone, one forward einsum [E, {tokens * args.k}/E, {args.hidden}] × "
            f"[E, {args.hidden}, {args.width}] (the same FLOPs at every E): {probe_txt}\n")
    for impl in (i for i in IMPLS if i in impls_at(args, tokens)):
        if e0 == e1:
            break
        r = {x["e"]: x for x in rows if x["impl"] == impl}
        stats = {"median": r[e1]["ratio"], "min": r[e1]["ratio_best"], "paired": r[e1]["ratio_paired"]}
        ratios = (", ".join(f"{v:.2f}× ({k})" for k, v in stats.items())
                  + f", CPU time {r[e1]['ratio_cpu']:.2f}× (paired)")
        if impl == FLOOR:
            out += f"  - step(E={e1}) / step(E={e0}) of the `{FLOOR}` (the bound for any dispatch): {ratios}\n"
            continue
        if not impl.startswith("dropless") or impl == "dropless ragged_dot":  # no CPU path: for comparison
            out += f"  - step(E={e1}) / step(E={e0}) of `{impl}`: {ratios}\n"
            continue
        met = [k for k, v in stats.items() if v <= GOAL]
        verdict = "met" if len(met) == 3 else f"borderline: met by the {' and '.join(met)} only" if met else "missed"
        floor = {x["e"]: x for x in rows if x["impl"] == FLOOR}
        if verdict != "met" and floor and min(floor[e1]["ratio"], floor[e1]["ratio_paired"]) > GOAL:
            verdict += f"; the `{FLOOR}` is above {GOAL} too, so no dispatch meets it at this token count"
        out += (f"  - step(E={e1}) / step(E={e0}) of `{impl}`{' (the CPU default)' if impl == DEFAULT_IMPL else ''}: "
                + ratios + f" vs the goal ≤ {GOAL} (wall time): **{verdict}**\n")
    return out


def header(args, groups: list[str], load: tuple[float, float], wall_s: float) -> str:
    e0 = min(args.experts)
    preload = os.environ.get("LD_PRELOAD")
    return (f"Step time (forward + backward: jitted `jax.value_and_grad` of `mean(y**2)` w.r.t. the block's "
            f"`nnx.Param`s and its input x, as a layer's backward in training) of one `MoEBlock` (router + routed "
            f"SwiGLU experts, no shared expert) as the number of experts E grows at fixed top-k and expert width, "
            f"i.e. the same active parameters per token. "
            f"The issue's goal: step(E=64) / step(E=8) ≤ {GOAL} for the default (dropless) path. "
            f"Each token count is a separate group of rows, timed on its own: median (and min) of {args.repeats} "
            f"steps, every (E, impl) of the group taking turns in a random order, each timed "
            f"step right after an untimed one of the same executable; tokens/s "
            f"uses the median; the ratio is to E={e0} of the same impl and token count: of the medians, of the mins, "
            f"and paired (the median over rounds of the ratio within a round, robust to load that drifts between "
            f"rounds). CPU ms: median user + kernel time of this process over the step (all threads; it leaves "
            f"out the time other processes hold the cores; the kernel part is mostly page faults on the buffers "
            f"XLA maps afresh each step), its ratio paired as above. `{FLOOR}` is the block without "
            f"dispatch (router and statistics as in the block, token-slot s to expert s·E/(T·k): equal loads, no "
            f"sort, no gathers; `floor_output`): what it costs more at E=64 than at E=8 no dispatch can "
            f"save. Under each token count, XLA's batched matmul alone (`matmul_probe`: one forward einsum of "
            f"the floor's per-expert shape, same FLOPs at every E; cores busy = CPU / wall time) shows what the "
            f"floor rests on: per-expert matmuls of few rows run slower and on fewer cores. Peak MiB is XLA's buffer "
            f"estimate (`compiled.memory_analysis()`: temp + argument + output bytes), not a measured RSS. The "
            f"dropless paths agree (relative {RTOL:g}) before timing. `dropless bucketed` runs the experts' "
            f"SwiGLU fused on one bucket layout (`grouped_matmul.expert_swiglu`); `{UNFUSED}` is the same dispatch "
            f"with three `grouped_matmul` calls, each building its own layout (only with `--impls`). Timed only up to "
            f"{args.slow_max_tokens} tokens, to keep the run short: `dropless ragged_dot` (XLA's dense CPU "
            f"fallback) and `dense` grow with E by construction, `capacity` is flat in E but its one-hot dispatch "
            f"grows with tokens² (~8 s a step at 4096 tokens). Run `python -m experiments.bench.moe "
            f"--experts {','.join(map(str, args.experts))} --batch {args.batch} "
            f"--seq {','.join(map(str, args.seq))} --hidden {args.hidden} --width {args.width} --k {args.k} "
            f"--repeats {args.repeats} --impls '{','.join(args.impls)}' --slow-max-tokens {args.slow_max_tokens}` "
            f"({wall_s:.0f} s wall).\n\n"
            f"- shapes: hidden {args.hidden}, top-k {args.k}, expert width {args.width}, capacity factor "
            f"{args.capacity_factor:g}; routing: the initialised router on N(0, 1) inputs (roughly balanced, no "
            f"trained skew)\n"
            + "".join(groups) +
            f"- measured: {utc_now()}, commit `{git_rev()}` + working tree\n"
            f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}`, allocator "
            f"{f'`LD_PRELOAD={preload}`' if preload else 'glibc malloc'}; "
            f"1-min load average {load[0]:.2f} "
            f"before / {load[1]:.2f} after (this run adds ~2; other processes skew the numbers)\n"
            f"- versions: jax {jax.__version__}, flax {flax.__version__}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--experts", type=ints, default=[8, 16, 32, 64])
    p.add_argument("--impls", type=lambda s: s.split(","), default=DEFAULT_IMPLS,
                   help=f"comma-separated, of {list(IMPLS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=ints, default=[2048, 1024, 256], help="comma-separated: one row group each")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=256, help="expert intermediate size")
    p.add_argument("--k", type=int, default=4, help="experts per token")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--slow-max-tokens", type=int, default=1024,
                   help=f"largest token count (batch x seq) at which {', '.join(SLOW)} are timed")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    if unknown := set(args.impls) - set(IMPLS):
        p.error(f"unknown impls {sorted(unknown)}; known: {list(IMPLS)}")
    args.experts = sorted(args.experts)

    t0, load_before = time.perf_counter(), os.getloadavg()[0]  # a busy host distorts every row
    rows, groups = [], []
    for seq in args.seq:
        group_rows, routing, probe = run(args, seq)
        rows += group_rows
        groups.append(group_lines(args, seq, group_rows, routing, probe))
    md = table(rows, min(args.experts))
    hdr = header(args, groups, (load_before, os.getloadavg()[0]), time.perf_counter() - t0)
    print(hdr + "\n" + md)
    write_section(args.out, SECTION, hdr + "\n" + md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
