"""Post-training stages on the tiny default: held-out chat accuracy per task after each stage.

    python -m experiments.bench.posttrain --base_hf=runs/tiny/hf --workdir=/tmp/posttrain [--out docs/benchmarks.md]

`--base_hf`: the transformers export of a `tiny.py` run (`make run`, then `experiments.export_hf`). Stages, each
started from the previous one's final weights and run by the training loop with its experiment file
(`experiments/configs/*_tiny.py`):
  base  the pre-trained model, asked in the chat format it has never seen;
  sft   `sft_tiny.py`: the tasks as chat, the loss on the answers;
  dpo   `dpo_tiny.py`: right vs near-miss answers, the SFT model as the frozen reference;
  simpo `dpo_tiny.py --config.dpo.loss=simpo`: the same pairs, no reference;
  grpo  `grpo_tiny.py`: RL with the exact-answer verifier from the SFT weights, with and without dynamic
        sampling, `--grpo_steps` updates each.
Every stage is scored by the same evaluation (`synthetic.tasks.make_chat_eval_fn`: greedy chat answers to the
first `--eval_examples` held-out prompts, right only when the whole answer is; the held-out loss on the answer
tokens), with the raw weights (the stages' EMA is reported beside them). Wall times include compilation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import jax

from ernie_jax.checkpoint.hf import from_pretrained, save_pretrained
from ernie_jax.experiment import load_experiment
from ernie_jax.synthetic.chat_tasks import TASKS
from ernie_jax.train.loop import evaluate, train
from experiments.bench.report import git_rev, utc_now, write_section

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(name: str, **changes):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for k, v in changes.items():
        if isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    return c


def _row(stage: str, steps: int, wall: float, m: dict) -> dict:
    return dict(stage=stage, steps=steps, wall=wall, loss=m.get("eval/loss", float("nan")),
                acc=m["eval/accuracy"], ema=m.get("ema_eval/accuracy"),
                tasks={t: m.get(f"eval/acc_{t}", float("nan")) for t in TASKS})


def run(args) -> list[dict]:
    rows = []
    base_exp = load_experiment(_config("sft_tiny", init_from=args.base_hf, eval_examples=args.eval_examples))
    eval_fn = base_exp.make_eval_fn()
    t0 = time.perf_counter()
    base = from_pretrained(args.base_hf, config=base_exp.model)
    rows.append(_row("base (pre-trained)", 0, time.perf_counter() - t0, eval_fn(base, 0)))
    print(rows[-1], flush=True)

    stages = [("sft", "sft_tiny", {}, args.sft_steps, args.base_hf),
              ("dpo", "dpo_tiny", {}, args.dpo_steps, "sft"),
              ("simpo", "dpo_tiny", {"dpo": {"loss": "simpo", "beta": 2.0, "gamma": 0.5}}, args.dpo_steps, "sft")]
    exported = {}
    for name, config, changes, steps, start in stages:
        init = exported.get(start, start)
        exp = load_experiment(_config(config, init_from=init, total_steps=steps, eval_examples=args.eval_examples,
                                      eval_every_steps=0, **changes))
        workdir = os.path.join(args.workdir, name)
        data = exp.make_pipeline()
        objective, keys = exp.objective
        t0 = time.perf_counter()
        if exp.dpo is not None and exp.dpo.needs_reference:
            from ernie_jax.posttrain.dpo import WithReference
            data = WithReference(data, from_pretrained(init, config=exp.model), exp.data.train.max_docs_per_row)
        out = train(exp.train, workdir, data, progress=False, objective=objective, batch_keys=keys)
        wall = time.perf_counter() - t0
        m = evaluate(exp.make_eval_fn(), out["model"], out["state"], out["step"])
        rows.append(_row(name, out["step"], wall, m))
        print(rows[-1], flush=True)
        exported[name] = os.path.join(workdir, "hf")
        save_pretrained(out["model"], exported[name])
    for name, ds in (("grpo + dynamic sampling", True), ("grpo", False)):
        rows.append(_grpo(args, exported["sft"], os.path.join(args.workdir, "grpo_ds" if ds else "grpo"), ds))
        print(rows[-1], flush=True)
    return rows


def _grpo(args, init: str, workdir: str, dynamic_sampling: bool) -> dict:
    """`grpo_tiny.py` from the SFT weights (with or without dynamic sampling), as `experiments.train` runs it."""
    from ernie_jax.data.tokenizer import SentencePieceTokenizer
    from ernie_jax.posttrain import chat
    from ernie_jax.posttrain.rl_loop import chat_prompts, exact_answer_rewards, train_grpo

    exp = load_experiment(_config("grpo_tiny", init_from=init, total_steps=args.grpo_steps,
                                  eval_examples=args.eval_examples, checkpoint_every_steps=args.grpo_steps,
                                  grpo={"dynamic_sampling": dynamic_sampling}))
    tok = SentencePieceTokenizer(exp.data.train.tokenizer)
    t0 = time.perf_counter()
    out = train_grpo(exp.train, exp.grpo, workdir, chat_prompts(exp.data.train), exact_answer_rewards(), tok,
                     encode=lambda e: chat.prompt(e["messages"], tok).tolist(), progress=False,
                     eval_fn=exp.make_eval_fn(), eval_every_steps=max(args.grpo_steps // 4, 1))
    wall = time.perf_counter() - t0
    m = evaluate(exp.make_eval_fn(), out["model"], out["state"], out["step"])
    row = _row("grpo + dynamic sampling" if dynamic_sampling else "grpo", out["step"], wall, m)
    row["rollouts"] = out["rollouts"]
    rollouts = {}  # step -> rollouts so far, and the held-out accuracy at the evaluated steps
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        d = json.loads(line)
        if "rollouts" in d:
            rollouts[d["step"]] = d["rollouts"]
        if "eval/accuracy" in d:
            row.setdefault("curve", []).append((d["step"], rollouts.get(d["step"]), d["eval/accuracy"]))
    return row


def table(rows: list[dict], args) -> str:
    head = "| stage | steps | rollouts | wall s | held-out answer loss | accuracy | EMA accuracy | " + \
        " | ".join(TASKS) + " |"
    lines = [head, "|" + "---|" * (7 + len(TASKS))]
    for r in rows:
        ema = "-" if r["ema"] is None else f"{r['ema']:.3f}"
        lines.append(f"| {r['stage']} | {r['steps']} | {r.get('rollouts', '-')} | {r['wall']:.0f} | {r['loss']:.3f} | "
                     f"{r['acc']:.3f} | {ema} | " + " | ".join(f"{r['tasks'][t]:.2f}" for t in TASKS) + " |")
    return (f"Measured {utc_now()} at {git_rev()} on {platform.machine()} ({os.cpu_count()} cores, "
            f"{jax.default_backend()}): `python -m experiments.bench.posttrain --base_hf={args.base_hf} "
            f"--sft_steps={args.sft_steps} --dpo_steps={args.dpo_steps} --grpo_steps={args.grpo_steps} "
            f"--eval_examples={args.eval_examples}`. "
            "Each stage starts from the previous one's final weights (DPO and SimPO both from SFT); accuracy is "
            f"greedy chat answers to the first {args.eval_examples} held-out prompts, right only when the whole "
            "answer is; wall time includes compilation and the reference model's scoring.\n\n" + "\n".join(lines)
            + _curves(rows))


def _curves(rows: list[dict]) -> str:
    """GRPO's held-out accuracy against the answers sampled so far (rollouts), with and without dynamic sampling."""
    out = ["", "", "GRPO's held-out accuracy by rollouts sampled (steps in brackets):", "",
           "| run | " + " | ".join(f"eval {i + 1}" for i in range(4)) + " |", "|---|---|---|---|---|"]
    for r in rows:
        if "curve" in r:
            cells = [f"{acc:.3f} at {ro:,.0f} ({step})" for step, ro, acc in r["curve"]]
            out.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_hf", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--sft_steps", type=int, default=200)
    p.add_argument("--dpo_steps", type=int, default=100)
    p.add_argument("--grpo_steps", type=int, default=40)
    p.add_argument("--eval_examples", type=int, default=400)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = run(args)
    body = table(rows, args)
    print(body)
    if args.out:
        write_section(Path(args.out), "## Post-training stages (experiments/bench/posttrain.py)", body)


if __name__ == "__main__":
    main()
