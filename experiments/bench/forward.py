"""Forward-pass throughput: our jitted JAX forward vs transformers (torch eager / sdpa), fp32, on the host.

    python -m experiments.bench.forward [--configs tiny,small] [--batch 4] [--seq 256] [--repeats 7]

Both sides run the same weights: ours are written with `save_pretrained` and loaded by
`Ernie4_5ForCausalLM`, and the logits are checked to agree before anything is timed. Compile time
(ours) is reported apart from the steady-state median. The Markdown table is printed and written as
the `## Forward pass` section of `--out`; other `## ` sections of that file are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import flax
import jax
import numpy as np
import torch  # only this script needs torch; the library never imports it
import transformers
from flax import nnx

import ernie_jax
from ernie_jax.model import create_model
from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## Forward pass (experiments/bench/forward.py)"
CONFIGS = {
    "tiny": lambda: ernie_jax.get_preset("tiny"),
    # The 0.3B shapes (hidden 1024, GQA 16/2, head_dim 128) with fewer layers and a smaller vocab so one
    # call takes a few seconds on 2 cores.
    "small": lambda: ernie_jax.get_preset("ernie-4.5-0.3b", num_hidden_layers=4, vocab_size=8192),
}
ATOL = 1e-4
jax.config.update("jax_platforms", "cpu")  # torch runs on the CPU, so ours must too


def bench_config(name: str, batch: int, seq: int, repeats: int) -> list[dict]:
    cfg = CONFIGS[name]()
    model = create_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)

    # Ours: compile ahead of time so compile cost is measured apart from the steady state.
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).logits)
    ids_j = jax.numpy.asarray(ids)
    t0 = time.perf_counter()
    compiled = fwd.lower(state, ids_j).compile()
    compile_s = time.perf_counter() - t0
    ref = np.asarray(compiled(state, ids_j))  # also the warm-up call
    impls = {"ours (jax/xla)": lambda: jax.block_until_ready(compiled(state, ids_j))}

    ids_t = torch.from_numpy(ids.astype(np.int64))
    with tempfile.TemporaryDirectory() as tmp:
        ernie_jax.save_pretrained(model, tmp)
        for attn in ("eager", "sdpa"):
            hf = transformers.Ernie4_5ForCausalLM.from_pretrained(
                tmp, attn_implementation=attn, dtype=torch.float32).eval()
            with torch.inference_mode():
                diff = float(np.abs(hf(ids_t).logits.numpy() - ref).max())  # also the warm-up call
            print(f"[{name}] max |logits ours - torch {attn}| = {diff:.2e}")
            if diff > ATOL:  # otherwise the timings would compare different computations
                raise SystemExit(f"{name}/{attn}: logits differ by {diff:.2e} > {ATOL:g}")
            impls[f"torch {attn}"] = lambda hf=hf: hf(ids_t)

    # Round-robin over the implementations, so that a change in background load hits all of them alike.
    times: dict[str, list[float]] = {k: [] for k in impls}
    with torch.inference_mode():
        for _ in range(repeats):
            for k, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    best = {k: 1e3 * min(v) for k, v in times.items()}  # the least load-sensitive figure, shown beside
    return [dict(config=name, params=ernie_jax.count_params(cfg), shape=f"{batch}×{seq}", impl=k,
                 compile_s=compile_s if k.startswith("ours") else None, ms=ms[k], best_ms=best[k],
                 tok_s=batch * seq / (ms[k] / 1e3), vs_eager=ms["torch eager"] / ms[k]) for k in impls]


def table(rows: list[dict]) -> str:
    lines = ["| config | params | B×S | impl | compile s | median ms | min ms | tokens/s | vs torch eager |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        compile_s = "–" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['shape']} | {r['impl']} | {compile_s} "
                     f"| {r['ms']:.1f} | {r['best_ms']:.1f} | {r['tok_s']:,.0f} | {r['vs_eager']:.2f}× |")
    return "\n".join(lines)


def header(args, load: tuple[float, float]) -> str:
    return (f"Tokens/s of one fp32 forward pass (prefill, no KV cache), our `jax.jit` forward vs "
            f"`transformers.Ernie4_5ForCausalLM` with the same weights (logits agree to < {ATOL:g}). "
            f"Median (and min) of {args.repeats} calls after a warm-up, the implementations taking turns; "
            f"tokens/s and the ratio use the median; compile time is excluded and shown apart. "
            f"Run `python -m experiments.bench.forward --configs {args.configs} --batch {args.batch} "
            f"--seq {args.seq} --repeats {args.repeats}`.\n\n"
            f"- measured: {utc_now()}, commit `{git_rev()}`\n"
            f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}`, torch threads {torch.get_num_threads()}; "
            f"1-min load average {load[0]:.2f} before / {load[1]:.2f} after "
            f"(this run adds ~2; other processes skew the numbers)\n"
            f"- versions: jax {jax.__version__}, flax {flax.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count())  # XLA's CPU backend uses every core too
    load_before = os.getloadavg()[0]  # recorded because a busy host distorts every row
    rows = []
    for name in args.configs.split(","):
        rows += bench_config(name, args.batch, args.seq, args.repeats)
    md = table(rows)
    print(md)
    write_section(args.out, SECTION, header(args, (load_before, os.getloadavg()[0])) + "\n" + md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
