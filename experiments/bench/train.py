"""Training-step throughput (ours vs a transformers + torch AdamW step) and the async-checkpoint stall.

    python -m experiments.bench.train [--configs tiny,tiny-moe] [--batch 16] [--seq 128] [--repeats 7]
                                      [--warmup 3] [--ckpt-repeats 3]

1. Tokens/s of one full training step on the host CPU, fp32, same weights and same batch on both sides:
   - ours: `ernie_jax.train.step.make_train_step` (forward, backward, global-norm clip, AdamW update, as
     `ernie_jax.train.loop.train` runs it) under `jax.jit` with the state donated, compiled ahead of time
     (compile time shown apart);
   - torch: `transformers.AutoModelForCausalLM.from_pretrained` of our `ernie_jax.save_pretrained` export
     (sdpa attention, the transformers default), `loss.backward()`, `clip_grad_norm_(1.0)`,
     `torch.optim.AdamW` step, `zero_grad`; run at all cores' and at 1 intra-op thread (on a shared host one
     thread is often faster); the ratio is to the faster torch setting.
   Both use the mean next-token cross-entropy on an unpacked batch (no document masking, no aux losses),
   AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.1, constant lr 1e-3. The first step's losses are checked to agree
   before anything is timed. After `--warmup` steps each, the implementations take turns for `--repeats`
   steps; tokens/s and the ratio use the median step time. The process CPU time per step is shown too (on a
   shared host the wall clock also counts waiting for a core), and the bound the host sets: analytic model
   FLOPs per step over its fp32 matmul peak measured in the same run.
2. The checkpoint stall: the time `Checkpointer.save` (what the training loop calls) blocks the loop with
   async saves on, against the time a synchronous save takes, for a train state of a few hundred MB (the
   0.3B layer shapes, fewer layers, a smaller vocab). Async saves are waited for outside the timed call
   (as training steps would run meanwhile); the background time to finish is shown too.

The Markdown tables are printed and written as the `## Training step` section of `--out`; other sections
are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint
import torch  # only this script needs torch; the library never imports it
import transformers

import ernie_jax
from ernie_jax.checkpoint.orbax import Checkpointer
from ernie_jax.model import create_model
from ernie_jax.train.flops import flops_per_token, measure_peak_tflops
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer
from ernie_jax.train.step import LossConfig, init_train_state, make_train_step
from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## Training step and checkpoint stall (experiments/bench/train.py)"
GOAL_SPEED, GOAL_STALL = 3.0, 0.1
LR = 1e-3
OURS = "ours (jax/xla)"
CONFIGS = {
    "tiny": lambda: ernie_jax.get_preset("tiny"),
    # tiny with 8 routed experts (top-2) + 1 shared expert in layers 1-3; layer 0 dense.
    "tiny-moe": lambda: ernie_jax.get_preset("tiny", moe_num_experts=8, moe_k=2, moe_intermediate_size=(192,),
                                            moe_num_shared_experts=1, moe_layer_start_index=1),
}
# ~220 MB of train state (fp32 params + two AdamW moments): the 0.3B layer shapes, 1 layer, vocab 4096.
CKPT_CONFIG = dict(name="ernie-4.5-0.3b", num_hidden_layers=1, vocab_size=4096)
jax.config.update("jax_platforms", "cpu")  # torch runs on the CPU, so ours must too


def _batch(cfg, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    tok = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
    return tok[:, :-1], tok[:, 1:]


def bench_step(name: str, batch: int, seq: int, repeats: int, warmup: int) -> dict:
    cfg = CONFIGS[name]()
    model = create_model(cfg, seed=0)
    ids, tgt = _batch(cfg, batch, seq)

    # ours: the trainer's step (no aux / z / MTP terms, no EMA: the same objective as the torch side)
    tx, schedule = make_optimizer(OptimizerConfig(peak_lr=LR, min_lr=LR, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
                                                  weight_decay=0.1, clip_norm=1.0), total_steps=10**6)
    loss_cfg = LossConfig(mtp_coef=0.0)
    state = init_train_state(model, tx, ema=False)
    jbatch = {"tokens": jnp.asarray(ids[None]), "targets": jnp.asarray(tgt[None]),
              "loss_mask": jnp.ones((1, batch, seq), jnp.int32)}
    t0 = time.perf_counter()
    step = jax.jit(make_train_step(model, tx, schedule, loss_cfg), donate_argnums=0).lower(state, jbatch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def ours():
        box["state"], m = step(box["state"], jbatch)
        jax.block_until_ready((box["state"], m))
        return float(m["loss"])

    # torch: the same weights through our HF export
    with tempfile.TemporaryDirectory() as tmp:
        ernie_jax.save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids_t, tgt_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(tgt.astype(np.int64))

    def theirs(threads: int):
        torch.set_num_threads(threads)
        logits = hf(input_ids=ids_t).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt_t.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    impls = {OURS: ours}
    for n in sorted({os.cpu_count(), 1}, reverse=True):
        impls[f"transformers (torch, sdpa) + AdamW, {n} thread{'s' * (n > 1)}"] = lambda n=n: theirs(n)
    first = {k: fn() for k, fn in impls.items()}  # ours and the first torch row see the initial weights
    torch_first = next(v for k, v in first.items() if k != OURS)
    diff = abs(first[OURS] - torch_first)
    print(f"[{name}] first-step loss ours {first[OURS]:.6f}, torch {torch_first:.6f}")
    if diff > 1e-4 * max(1.0, abs(first[OURS])):
        raise SystemExit(f"{name}: first-step losses differ by {diff:.2e}: not the same computation")
    for _ in range(warmup - 1):  # torch's first steps are slow (allocator, oneDNN primitives)
        for fn in impls.values():
            fn()
    times, cpu = {k: [] for k in impls}, {k: [] for k in impls}
    for _ in range(repeats):  # round-robin: a change in background load hits all alike
        for k, fn in impls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)  # all threads of the process: the work, less the waiting
    torch.set_num_threads(os.cpu_count())
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = min(v for k, v in med.items() if k != OURS)  # the faster torch thread setting
    flops = flops_per_token(cfg, seq) * batch * seq
    return dict(config=name, params=ernie_jax.count_params(cfg), shape=f"{batch}×{seq}", loss_diff=diff,
                gflop=flops / 1e9, ref_ms=1e3 * ref,
                rows=[dict(impl=k, compile_s=compile_s if k == OURS else None, ms=1e3 * med[k],
                           best_ms=1e3 * min(times[k]), cpu_ms=1e3 * statistics.median(cpu[k]),
                           tok_s=batch * seq / med[k], gflops=flops / med[k] / 1e9, speed=ref / med[k])
                      for k in impls])


def bench_checkpoint(repeats: int) -> dict:
    c = dict(CKPT_CONFIG)
    cfg = ernie_jax.get_preset(c.pop("name"), **c)
    tx, _ = make_optimizer(OptimizerConfig(warmup_steps=0), 100)
    state = init_train_state(create_model(cfg, seed=0), tx, ema=False)
    # a trained state's moments are not zeros (which compress to nothing): fill every float leaf with noise
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    data_state = {"next_batch": 0}
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    sync_s, stall_s, bg_s = [], [], []
    try:
        ck_sync = Checkpointer(str(root / "sync"), max_to_keep=2, async_save=False)
        ck_async = Checkpointer(str(root / "async"), max_to_keep=2, async_save=True)
        ck_sync.save(0, state, data_state)  # warm-up: first-save set-up (directories, handler registry)
        ck_async.save(0, state, data_state)
        ck_async.wait()
        for i in range(1, repeats + 1):
            t0 = time.perf_counter()
            ck_sync.save(i, state, data_state)
            sync_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ck_async.save(i, state, data_state)
            stall_s.append(time.perf_counter() - t0)
            ck_async.wait()
            bg_s.append(time.perf_counter() - t0)
        ck_sync.close()
        ck_async.close()
        on_disk = sum(f.stat().st_size for f in (root / "async" / str(repeats)).rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync, stall, bg = (statistics.median(v) for v in (sync_s, stall_s, bg_s))
    return dict(params=ernie_jax.count_params(cfg), state_mb=nbytes / 1e6, disk_mb=on_disk / 1e6, sync_s=sync,
                stall_s=stall, bg_s=bg, ratio=stall / sync, sync_all=sync_s, stall_all=stall_s, repeats=repeats)


def tables(steps: list[dict], ck: dict) -> str:
    lines = ["| config | params | B×S | impl | compile s | median ms | min ms | CPU ms | tokens/s | GFLOP/s "
             "| speed vs faster torch |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        for r in s["rows"]:
            comp = "–" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
            lines.append(f"| {s['config']} | {s['params'] / 1e6:.2f}M | {s['shape']} | {r['impl']} | {comp} "
                         f"| {r['ms']:.1f} | {r['best_ms']:.1f} | {r['cpu_ms']:.1f} | {r['tok_s']:,.0f} "
                         f"| {r['gflops']:.1f} | {r['speed']:.2f}× |")
    lines += ["", "| train state | on disk | synchronous save s | async: `save()` blocks s | async: written after s "
              "| stall / sync save |", "|---:|---:|---:|---:|---:|---:|",
              f"| {ck['state_mb']:.0f} MB ({ck['params'] / 1e6:.1f}M params + AdamW) | {ck['disk_mb']:.0f} MB "
              f"| {ck['sync_s']:.3f} | {ck['stall_s']:.3f} | {ck['bg_s']:.3f} | {ck['ratio']:.3f} |"]
    return "\n".join(lines)


def header(args, steps: list[dict], ck: dict, load: tuple[float, float], peak_gflops: float) -> str:
    worst = min(r["speed"] for s in steps for r in s["rows"] if r["impl"] == OURS)
    bounds = "; ".join(f"{s['config']}: {s['gflop']:.1f} GFLOP, ≥ {1e3 * s['gflop'] / peak_gflops:.0f} ms at that "
                       f"peak, vs {s['ref_ms'] / GOAL_SPEED:.0f} ms for {GOAL_SPEED:g}× the torch step"
                       for s in steps)
    speed_ok = "**met**" if worst >= GOAL_SPEED else "**missed**"
    stall_ok = "**met**" if ck["ratio"] <= GOAL_STALL else "**missed**"
    return (f"Tokens/s of one fp32 training step on the host CPU (forward, backward, global-norm clip 1.0, AdamW "
            f"b1 0.9 / b2 0.95 / wd 0.1 at lr {LR:g}): ours is the trainer's jitted step "
            f"(`ernie_jax.train.step.make_train_step`, state donated, compiled ahead of time: compile time apart), "
            f"theirs `transformers.AutoModelForCausalLM` (sdpa attention) loaded from our `save_pretrained` export "
            f"with `torch.optim.AdamW`, run at {os.cpu_count()} and at 1 intra-op thread (`torch.set_num_threads` "
            f"before each step: on a shared host one thread is often faster; the ratio is to the faster of the "
            f"two); same weights, same unpacked random-token batch, mean next-token cross-entropy only "
            f"(first-step losses agree to {max(s['loss_diff'] for s in steps):.1e}). One process, median (and min) "
            f"of {args.repeats} steps "
            f"after {args.warmup} warm-up steps, the implementations taking turns; `CPU ms` is the median process "
            f"CPU time of a step (all threads: the work done, without the time spent waiting for a core, which "
            f"the wall-clock columns include on a loaded host); GFLOP/s counts the analytic model FLOPs "
            f"(`ernie_jax.train.flops.flops_per_token`: matmuls x 6, attention causal-halved). "
            f"Then the checkpoint stall: the time "
            f"`ernie_jax.checkpoint.orbax.Checkpointer.save` (the loop's call: train state + data-iterator "
            f"state) blocks with async saves on, vs a synchronous save of the same state, median of "
            f"{ck['repeats']} saves each, to the local disk under the temp dir (the page cache absorbs much of the write); "
            f"async saves are waited for outside the timed call, as training steps would run meanwhile. "
            f"Checkpoint model: `{CKPT_CONFIG['name']}` with {CKPT_CONFIG['num_hidden_layers']} layer, vocab "
            f"{CKPT_CONFIG['vocab_size']}, every float of the state random (trained moments do not compress). "
            f"Run `python -m experiments.bench.train --configs {args.configs} "
            f"--batch {args.batch} --seq {args.seq} --repeats {args.repeats} --warmup {args.warmup} "
            f"--ckpt-repeats {args.ckpt_repeats}`."
            f"\n\n"
            f"- goal (issue #7): ours ≥ {GOAL_SPEED:g}× the (faster) torch step: slowest config {worst:.2f}×: "
            f"{speed_ok}\n"
            f"- what bounds the step: the model FLOPs per step over this host's fp32 matmul peak, measured in the "
            f"same run (`measure_peak_tflops`: a jitted 1024³ matmul, best of 5, all cores): "
            f"{peak_gflops:.0f} GFLOP/s; {bounds}\n"
            f"- goal (issue #7): async-save stall ≤ {GOAL_STALL:g}× a synchronous save: {ck['ratio']:.3f}× "
            f"(all sync s: {', '.join(f'{x:.3f}' for x in ck['sync_all'])}; all stalls s: "
            f"{', '.join(f'{x:.3f}' for x in ck['stall_all'])}): {stall_ok}\n"
            f"- measured: {utc_now()}, commit `{git_rev()}`\n"
            f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}` (all cores); "
            f"1-min load average {load[0]:.2f} before / {load[1]:.2f} after "
            f"(this run adds ~2; other processes skew the numbers)\n"
            f"- versions: jax {jax.__version__}, flax {flax.__version__}, orbax-checkpoint "
            f"{orbax.checkpoint.__version__}, torch {torch.__version__}, transformers {transformers.__version__}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,tiny-moe", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ckpt-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count())  # XLA's CPU backend uses every core too
    load_before = os.getloadavg()[0]
    steps = [bench_step(n, args.batch, args.seq, args.repeats, args.warmup) for n in args.configs.split(",")]
    peak_gflops = 1e3 * measure_peak_tflops()
    ck = bench_checkpoint(args.ckpt_repeats)
    md = tables(steps, ck)
    print(md)
    write_section(args.out, SECTION,
                  header(args, steps, ck, (load_before, os.getloadavg()[0]), peak_gflops) + "\n" + md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
