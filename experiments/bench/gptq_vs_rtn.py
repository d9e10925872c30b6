"""GPTQ vs round-to-nearest: relative output error ||x w - x w_hat||^2 / ||x w||^2 of the projections of a
few decoder layers, at 2, 3 and 4 bits (asymmetric, per group of `--group_size` rows), and GPTQ's time per
weight.

    python -m experiments.bench.gptq_vs_rtn [--hf DIR] [--layers 0,3] [--group_size 32] [--rows 16]

x is each projection's input in a forward pass over packed rows of the embedded synthetic corpus: the
Hessian is accumulated on `--rows` train rows, the error is measured on as many held-out rows. `--hf`: a
transformers directory of a trained model (`python -m experiments.train --config=experiments/configs/tiny.py
--workdir=W --config.export_hf=True` writes W/hf); without it the `tiny` preset is randomly initialised.
The Markdown table is printed and, with `--out`, written as this script's `## ` section of that file.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ernie_jax
from ernie_jax.data import make_pipeline
from ernie_jax.model import create_model
from ernie_jax.quantization.calibration import capture_inputs
from ernie_jax.quantization.gptq import HessianAccumulator, gptq_dequantized
from ernie_jax.quantization.model import layer_slots
from ernie_jax.synthetic.text import default_data_config
from experiments.bench.report import git_rev, utc_now, write_section
from pallas_kernels.qmm import format as qformat

SECTION = "## GPTQ vs round-to-nearest (experiments/bench/gptq_vs_rtn.py)"
MEASURED = ("attn/wq", "attn/wo", "mlp/wi_gate", "mlp/wo")  # wk / wv share wq's input
jax.config.update("jax_platforms", "cpu")


def capture(model, batch) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, path): (x [T, K] of the real tokens, w [K, N])} of one forward pass (`capture_inputs`)."""
    stacks = nnx.to_pure_dict(nnx.state(model))["decoder"]["stacks"]
    slots = layer_slots(model.config)
    out = {}
    for (layer, rel), x in capture_inputs(model, batch).items():
        if rel in MEASURED:
            s, j = slots[layer]
            w = stacks[s]["layers"]
            for part in rel.split("/"):
                w = w[part]
            out[(layer, rel)] = (x, np.asarray(w[j], np.float32).reshape(x.shape[1], -1))
    return out


def rel_error(x: np.ndarray, w: np.ndarray, w_hat) -> float:
    x, w = x.astype(np.float64), w.astype(np.float64)
    y = x @ w
    return float(np.sum((y - x @ np.asarray(w_hat, np.float64)) ** 2) / np.sum(y ** 2))


def rtn(w: np.ndarray, bits: int, g: int) -> jax.Array:
    """format's round-to-nearest grid, for any bits (quantize() packs only 8 / 4 / 2)."""
    k, n = w.shape
    wg = jnp.asarray(w).reshape(k // g, g, n)
    s, z = qformat.group_grid(wg, bits, symmetric=False)
    return (qformat.codes_on_grid(wg, s, z, bits) * s[:, None] + z[:, None]).reshape(k, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default="", help="a transformers directory (trained weights); default: random init")
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 3])
    p.add_argument("--bits", type=lambda s: [int(v) for v in s.split(",")], default=[2, 3, 4])
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--rows", type=int, default=16, help="packed rows of 128 tokens, for calibration and test each")
    p.add_argument("--out", type=Path, default=None, help="write the table as a section of this file")
    a = p.parse_args()

    model = ernie_jax.from_pretrained(a.hf) if a.hf else create_model(ernie_jax.get_preset("tiny"), seed=0)
    acts = {}
    for split in ("train", "heldout"):
        batch = next(iter(make_pipeline(default_data_config(split, seq_len=128, global_batch_size=a.rows))))
        acts[split] = capture(model, batch)

    errs: dict[tuple[int, str], list[float]] = {}
    gptq_s: dict[int, list[float]] = {}
    for layer in a.layers:
        for name in MEASURED:
            x_cal, w = acts["train"][(layer, name)]
            x_test = acts["heldout"][(layer, name)][0]
            acc = HessianAccumulator(w.shape[0])
            acc.add(x_cal)
            h = acc.hessian()
            for bits in a.bits:
                gptq_dequantized(w, h, bits, a.group_size).block_until_ready()  # compile apart from the timing
                t0 = time.perf_counter()
                w_gptq = gptq_dequantized(w, h, bits, a.group_size).block_until_ready()
                gptq_s.setdefault(bits, []).append(time.perf_counter() - t0)
                errs.setdefault((bits, "RTN"), []).append(rel_error(x_test, w, rtn(w, bits, a.group_size)))
                errs.setdefault((bits, "GPTQ"), []).append(rel_error(x_test, w, w_gptq))

    weights = ", ".join(f"{n} {tuple(acts['train'][(a.layers[0], n)][1].shape)}" for n in MEASURED)
    lines = [
        f"Weights: {'trained (' + a.hf + ')' if a.hf else 'tiny, random init'}; layers {a.layers}: {weights}. "
        f"Asymmetric, groups of {a.group_size} rows. Hessian from {len(acts['train'][(a.layers[0], 'attn/wq')][0])} "
        f"train tokens; error on {len(acts['heldout'][(a.layers[0], 'attn/wq')][0])} held-out tokens. "
        f"Relative output error ||x w - x w_hat||^2 / ||x w||^2: mean (max) over the {len(errs[(a.bits[0], 'RTN')])} "
        f"weights.",
        "", "| bits | RTN | GPTQ | GPTQ / RTN | GPTQ ms / weight |", "|---|---|---|---|---|"]
    for bits in a.bits:
        r, g = np.array(errs[(bits, "RTN")]), np.array(errs[(bits, "GPTQ")])
        lines.append(f"| {bits} | {r.mean():.4f} ({r.max():.4f}) | {g.mean():.4f} ({g.max():.4f}) | "
                     f"{np.mean(g / r):.2f} | {np.median(gptq_s[bits]) * 1e3:.0f} |")
    lines += ["", f"GPTQ ms / weight: median after compile. {platform.machine()}, jax {jax.__version__}, "
              f"commit {git_rev()}, {utc_now()}."]
    body = "\n".join(lines)
    print(body)
    if a.out:
        write_section(a.out, SECTION, body)


if __name__ == "__main__":
    main()
