"""Data pipeline throughput: tokens/s of `ernie_jax.data.make_pipeline` on the embedded default corpus,
pre-tokenized vs on-the-fly sentencepiece, Grain workers 0 and 2, against what the `tiny` model consumes
in training (jitted forward + backward of the token-balanced loss on the same packed batches).

    python -m experiments.bench.data [--seconds 6] [--workers 0,2] [--repeats 5]

Pipeline rows: the first batch (worker start-up, index build) is timed apart as "start s"; then batches are
drawn for `--seconds` and tokens/s = rows x seq_len / wall time ("real" counts only `loss_mask` positions).
The Markdown table is printed and written as the `## Data pipeline` section of `--out`; other sections kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
from flax import nnx

import ernie_jax
from ernie_jax.data import SentencePieceTokenizer, SourceConfig, make_pipeline
from ernie_jax.synthetic.text import default_data_config, ensure_default_data
from ernie_jax.losses import token_balanced_loss, token_cross_entropy
from ernie_jax.model import create_model
from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## Data pipeline (experiments/bench/data.py)"
GOAL = 20.0
jax.config.update("jax_platforms", "cpu")


def pretokenize(train: Path, tok_path: Path, out: Path) -> Path:
    tok = SentencePieceTokenizer(str(tok_path))
    with open(train, encoding="utf-8") as f, open(out, "w") as g:
        for line in f:
            g.write(json.dumps({"ids": tok.encode(json.loads(line)["text"]).tolist()}) + "\n")
    return out


def bench_pipeline(cfg, seconds: float) -> dict:
    t0 = time.perf_counter()
    it = make_pipeline(cfg)
    first = next(it)
    start = time.perf_counter() - t0
    n = real = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["tokens"].size
        real += int(b["loss_mask"].sum())
    dt = time.perf_counter() - t0
    it.close()
    return {"start": start, "tok_s": n / dt, "real_tok_s": real / dt, "fill": real / n, "first": first}


def bench_training(batch: dict, repeats: int) -> dict:
    """Step time of the tiny model's jitted forward + backward on one packed batch (no optimizer update)."""
    model = create_model(ernie_jax.get_preset("tiny"), seed=0)
    graphdef, state = nnx.split(model)

    def loss_fn(st, b):
        out = nnx.merge(graphdef, st)(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"])
        return token_balanced_loss(token_cross_entropy(out.logits, b["targets"]), b["loss_mask"])[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    b = {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_ids"}
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, b))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, b))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"compile": compile_s, "median_ms": med * 1e3, "min_ms": min(times) * 1e3,
            "tok_s": batch["tokens"].size / med}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per pipeline row")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    paths = ensure_default_data()
    base = default_data_config()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ids_path = pretokenize(paths["train"], paths["tokenizer"], Path(tmp) / "train_ids.jsonl")
        pretok_s = time.perf_counter() - t0
        variants = {"on-the-fly (text JSONL + sentencepiece)": base.sources,
                    "pre-tokenized (ids JSONL)": (SourceConfig(path=str(ids_path), kind="ids"),)}
        rows, batch = [], None
        for name, sources in variants.items():
            for w in (int(x) for x in args.workers.split(",")):
                r = bench_pipeline(base.replace(sources=sources, worker_count=w), args.seconds)
                batch = batch or r.pop("first")
                r.pop("first", None)
                rows.append({"source": name, "workers": w, **r})
                print(rows[-1], flush=True)
    train = bench_training(batch, args.repeats)
    print(train, flush=True)
    load_after = os.getloadavg()[0]

    md = ["| source | Grain workers | start s | tokens/s | real tokens/s | fill | vs tiny training |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['source']} | {r['workers']} | {r['start']:.2f} | {r['tok_s']:,.0f} | "
                  f"{r['real_tok_s']:,.0f} | {r['fill']:.1%} | {r['tok_s'] / train['tok_s']:.1f}× |")
    worst = min(r["tok_s"] for r in rows) / train["tok_s"]
    cfg = base
    hdr = (f"Tokens/s of `ernie_jax.data.make_pipeline` on the embedded default corpus (`data/default`, "
           f"{len(open(paths['train']).readlines()):,} documents): seq_len {cfg.seq_len}, global batch "
           f"{cfg.global_batch_size} rows, max {cfg.max_docs_per_row} docs per row, 1 process. The first batch "
           f"(worker start-up, index build) is timed apart as `start s`; then batches are drawn for "
           f"{args.seconds:g} s. `tokens/s` counts rows × seq_len, `real` only `loss_mask` positions. The "
           f"reference is the `tiny` preset's training consumption: jitted forward + backward of the "
           f"token-balanced loss on one packed {cfg.global_batch_size}×{cfg.seq_len} batch, median of "
           f"{args.repeats} steps after compile ({train['median_ms']:.1f} ms, min {train['min_ms']:.1f} ms, "
           f"= {train['tok_s']:,.0f} tokens/s; compile {train['compile']:.1f} s; no optimizer update, so the "
           f"real trainer consumes somewhat less). Pre-tokenizing the corpus took {pretok_s:.1f} s (not "
           f"timed in the rows). Run `python -m experiments.bench.data --seconds {args.seconds:g} --workers "
           f"{args.workers} --repeats {args.repeats}`.\n\n"
           f"- goal (issue #6): pipeline ≥ {GOAL:g}× the tiny model's training consumption: slowest row "
           f"{worst:.1f}×: **{'met' if worst >= GOAL else 'missed'}**\n"
           f"- measured: {utc_now()}, commit `{git_rev()}`\n"
           f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs, JAX backend `{jax.default_backend()}`; 1-min load average "
           f"{load_before:.2f} before / {load_after:.2f} after (other processes skew the numbers; with 2 "
           f"cores, 2 workers compete with the consuming process)\n"
           f"- versions: jax {jax.__version__}, grain {grain.__version__ if hasattr(grain, '__version__') else '?'}, "
           f"sentencepiece {__import__('sentencepiece').__version__}\n")
    text = "\n".join(md)
    print(text)
    write_section(args.out, SECTION, hdr + "\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
