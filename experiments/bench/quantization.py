"""Quantization schemes side by side on trained tiny models: held-out loss, task accuracy, weight bytes and
decode speed per weight scheme and KV-cache scheme, against the fp32 model, in one run.

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=W_DENSE
    python -m experiments.train --config=experiments/configs/tiny_moe.py --workdir=W_MOE --config.total_steps=300
    python -m experiments.bench.quantization --run dense:W_DENSE:experiments/configs/tiny.py \
        --run moe:W_MOE:experiments/configs/tiny_moe.py [--out docs/benchmarks.md]

Held-out loss: teacher-forced cross-entropy through the KV cache (`inference.decode` of whole rows written at
positions 0.., so the KV scheme's stored entries are what every token attends to) over the first document of
each packed held-out row of the run's data (later documents would attend across the document boundary).
Accuracy: greedy answers (`ernie_jax.generate`, with the KV scheme) to the run's `eval_examples` held-out
task prompts. Weight bytes: the decoder projections as stored / in bf16 (norms, routers, embeddings and
the head stay unquantized and are not counted). Decode: tokens/s of the engine decoding 8 prompts for 64
new tokens on this CPU (the XLA path: weights dequantized inside each step), every row compiled first and
then timed round-robin, best of 3.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ernie_jax
from ernie_jax.data import make_pipeline
from ernie_jax.data.tokenizer import SentencePieceTokenizer
from ernie_jax.experiment import load_run
from ernie_jax.inference import Engine, KVCacheConfig
from ernie_jax.inference.cache import init_cache
from ernie_jax.inference.decode import decode
from ernie_jax.quantization.calibration import layer_hessians
from ernie_jax.quantization.model import quantize_model, weight_bytes
from ernie_jax.quantization.scheme import get_scheme
from ernie_jax.synthetic import text
from ernie_jax.synthetic.tasks import pick_examples
from experiments.bench.report import git_rev, utc_now, write_section

SECTION = "## Quantization schemes (experiments/bench/quantization.py)"
jax.config.update("jax_platforms", "cpu")

# (label, weight scheme preset or None, method, KV cache)
ROWS = [("fp32", None, "rtn", None),
        ("W8A16", "w8a16", "rtn", None), ("W4A16 g128", "w4a16", "rtn", None),
        ("W2A16 g64 RTN", "w2a16", "rtn", None), ("W2A16 g64 GPTQ", "w2a16", "gptq", None),
        ("W8A8", "w8a8", "rtn", None), ("W4A8", "w4a8", "rtn", None), ("WINT2 (mixed)", "wint2", "rtn", None),
        ("KV int8", None, "rtn", KVCacheConfig(8)), ("KV int8 + Hadamard", None, "rtn", KVCacheConfig(8, True)),
        ("KV int4", None, "rtn", KVCacheConfig(4)), ("KV int4 + Hadamard", None, "rtn", KVCacheConfig(4, True))]


def _config(path: str):
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def first_documents(batch: dict) -> np.ndarray:
    """[R, S] bool: the loss-masked tokens of each row's first document."""
    seg = np.asarray(batch["segment_ids"])
    return np.asarray(batch["loss_mask"], bool) & (seg == seg[:, :1]) & (seg > 0)


def cached_loss(model, batches: list[dict], kv: KVCacheConfig | None) -> float:
    """Mean next-token cross-entropy over the first document of each row, every token attending to the cache."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, ids, targets):
        m = nnx.merge(graphdef, state)
        b, s = ids.shape
        cache = init_cache(m.config, b, s, kv_cache=kv)
        zeros = jnp.zeros((b,), jnp.int32)
        logits, _, _ = decode(m, ids, zeros, zeros, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    tot = cnt = 0.0
    for bt in batches:
        mask = first_documents(bt)
        out = np.asarray(nll(state, jnp.asarray(bt["tokens"]), jnp.asarray(bt["targets"])))
        tot += float(out[mask].sum())
        cnt += float(mask.sum())
    return tot / cnt


def accuracy(model, data_cfg, examples: list[dict], kv: KVCacheConfig | None) -> float:
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [([tok.bos_id] if data_cfg.add_bos else []) + tok.encode(e["prompt"]).tolist() for e in examples]
    max_new = max(len(tok.encode(e["answer"])) for e in examples) + 2
    outs = ernie_jax.generate(model, prompts, max_new_tokens=max_new, eos_token_id=tok.eos_id, kv_cache=kv)
    hits = []
    for e, p, o in zip(examples, prompts, outs):
        o = o[:-1] if o and o[-1] == tok.eos_id else o
        before, after = tok.decode(p), tok.decode(p + o)
        hits.append(text.check_answer(e, after[len(before):] if after.startswith(before) else tok.decode(o)))
    return float(np.mean(hits))


def decode_speeds(models: list, prompts: list[list[int]], new: int = 64, rounds: int = 3) -> list[float]:
    """Engine tokens/s of each (model, KV cache) decoding `prompts` for `new` tokens: each compiled first,
    then timed round-robin `rounds` times (the best of each kept), so that host noise hits every row alike."""
    def run(model, kv):
        e = Engine(model, max_slots=len(prompts), max_len=128, kv_cache=kv)
        for p in prompts:
            e.submit(p, max_new_tokens=new)
        t0 = time.perf_counter()
        e.run()
        return e.summary()["generated_tokens"] / (time.perf_counter() - t0)

    for m, kv in models:
        run(m, kv)  # compile
    best = [0.0] * len(models)
    for _ in range(rounds):
        for i, (m, kv) in enumerate(models):
            best[i] = max(best[i], run(m, kv))
    return best


def bench_model(name: str, workdir: str, config_file: str, n_loss_batches: int) -> list[str]:
    exp, model, step = load_run(_config(config_file), workdir, ema=False)
    data_cfg = exp.data.train
    heldout = list(itertools.islice(make_pipeline(exp.eval_data.heldout), n_loss_batches))
    examples = pick_examples(exp.evaluation.examples)
    tok = SentencePieceTokenizer(data_cfg.tokenizer)
    prompts = [[tok.bos_id] + tok.encode(e["prompt"]).tolist() for e in examples[:8]]
    hessians = layer_hessians(model, itertools.islice(make_pipeline(data_cfg), 2))
    cfg = model.config
    is_moe = cfg.moe_num_experts > 0
    lines, measured = [], []
    for label, preset, method, kv in ROWS:
        if preset == "wint2" and not is_moe:
            continue
        qmodel, ratio = model, None
        if preset is not None:
            kw = {"wint2_int4_layers": 2} if preset == "wint2" else {}
            qmodel = quantize_model(model, get_scheme(preset, method=method, **kw),
                                    hessians=hessians if method == "gptq" else None)
            stored, bf16 = weight_bytes(qmodel)
            ratio = stored / bf16
        measured.append((label, qmodel, kv, ratio, cached_loss(qmodel, heldout, kv),
                         accuracy(qmodel, data_cfg, examples, kv)))
        print(name, label, measured[-1][-2:], flush=True)
    speeds = decode_speeds([(m, kv) for _, m, kv, *_ in measured], prompts)
    base_loss, base_tps = measured[0][4], speeds[0]
    for (label, _, _, ratio, loss, acc), tps in zip(measured, speeds):
        rel = "—" if label == "fp32" else f"{(loss / base_loss - 1) * 100:+.2f}%"
        lines.append(f"| {name} | {label} | {loss:.4f} | {rel} | {acc:.3f} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} | {tps:.0f} ({tps / base_tps:.2f}x) |")
    if not is_moe:
        lines.append(f"| {name} | WINT2 (mixed) | — (no routed experts) | | | | |")
    head = (f"{name}: `{config_file}` trained {step} steps ({workdir}); loss on the first documents of "
            f"{n_loss_batches} held-out batches ({sum(int(first_documents(b).sum()) for b in heldout)} tokens), "
            f"accuracy on {len(examples)} held-out prompts.")
    return [head] + lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="NAME:WORKDIR:CONFIG_FILE (repeatable)")
    p.add_argument("--loss_batches", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="write the table as a section of this file")
    a = p.parse_args()
    heads, rows = [], []
    for spec in a.run:
        name, workdir, config_file = spec.split(":")
        out = bench_model(name, workdir, config_file, a.loss_batches)
        heads.append(out[0])
        rows += out[1:]
    body = "\n".join(
        heads + ["", "WINT2 here: experts of layers < 2 int4 per channel, later experts 2-bit in groups of 64, the "
                 "rest int8 (the released layout's boundary is layer 7 of 28). Δ loss: relative to the same "
                 "model's fp32 row. Weight bytes: decoder projections as stored / bf16. Decode: engine tokens/s "
                 "on this CPU (XLA path, the weights dequantized in every step; best of 3 round-robin), and its "
                 "ratio to fp32. Weight bytes \"—\": unquantized weights (the fp32 and KV-cache rows).",
                 "", "| model | scheme | held-out loss | Δ loss | accuracy | weight bytes / bf16 | decode tok/s |",
                 "|---|---|---|---|---|---|---|"] + rows
        + ["", f"{platform.machine()}, {jax.device_count()} CPU device(s), jax {jax.__version__}, commit {git_rev()}, "
           f"{utc_now()}."])
    print(body)
    if a.out:
        write_section(a.out, SECTION, body)


if __name__ == "__main__":
    main()
