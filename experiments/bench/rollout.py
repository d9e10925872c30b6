"""RL rollout throughput: a GRPO step's answers sampled by the engine's continuous batching vs one by one.

    python -m experiments.bench.rollout --hf_dir=runs/sft/hf [--out docs/benchmarks.md]

The rollouts of one `grpo_tiny.py` step (8 held-out task prompts x 8 samples, temperature 0.8, at most 12 new
tokens) go through `posttrain.rl_loop.rollout`: all in flight at once (one slot each), or through an engine
with a single slot (the prompts one after the other). Each way runs once to compile, then `--repeats` times
timed; the table has the median samples/s and their ratio, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from ernie_jax.checkpoint.hf import from_pretrained
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.posttrain import chat
from ernie_jax.posttrain.rl_loop import rollout
from ernie_jax.synthetic import chat_tasks
from ernie_jax.synthetic.text import ensure_default_data
from experiments.bench.report import git_rev, utc_now, write_section


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tok = SentencePieceTokenizer(str(ensure_default_data()["tokenizer"]))
    model = from_pretrained(a.hf_dir)
    prompts = [chat.prompt(e["messages"], tok).tolist() for e in chat_tasks.heldout_prompts(8) for _ in range(8)]
    seeds = list(range(len(prompts)))
    rates = {}
    for name, slots in (("continuous batching (64 slots)", None), ("one by one (1 slot)", 1)):
        run = lambda: rollout(model, prompts, max_new_tokens=12, temperature=0.8, seeds=seeds,  # noqa: E731
                              eos=tok.eos_id, decode=tok.decode, max_slots=slots)
        run()  # compile
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        rates[name] = len(prompts) / statistics.median(times)
        print(name, f"{rates[name]:.1f} samples/s", f"{sum(len(x) for x in out.answers)} tokens", flush=True)
    names = list(rates)
    body = (f"Measured {utc_now()} at {git_rev()} on {platform.machine()} ({os.cpu_count()} cores, "
            f"{jax.default_backend()}): `python -m experiments.bench.rollout --hf_dir={a.hf_dir}`, the SFT'd tiny "
            f"model; 64 samples per step, median of {a.repeats} after a compile run.\n\n"
            "| rollouts | samples/s | vs one by one |\n|---|---|---|\n"
            + "\n".join(f"| {n} | {rates[n]:.1f} | {rates[n] / rates[names[1]]:.1f}x |" for n in names))
    print(body)
    if a.out:
        write_section(Path(a.out), "## RL rollout throughput (experiments/bench/rollout.py)", body)


if __name__ == "__main__":
    main()
