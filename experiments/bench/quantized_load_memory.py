"""Peak host memory of loading a quantized checkpoint of the ERNIE-4.5-21B-A3B shape, against loading the same
weights in bf16: does loading quantized avoid materialising full-precision weights?

    python -m experiments.bench.quantized_load_memory [--layers 2] [--scheme w4a16] [--out docs/benchmarks.md]

The released widths (hidden 2560, 64 experts of width 1536 top-6 + 2 shared, vocab 103424) with `--layers`
decoder layers (layer 0 dense, the rest MoE) and no MTP block, parameters stored in bf16. A random model is
quantized and written (`save_quantized`) and also written as a transformers directory (bf16); each is then
loaded in a fresh process (`load_quantized` / `from_pretrained`) and the process's peak RSS (ru_maxrss) is
read, beside the RSS after importing jax and building the abstract model (the floor of either load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = "## Loading a quantized checkpoint (experiments/bench/quantized_load_memory.py)"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(layers: int):
    from ernie_jax.presets import get_preset
    return get_preset("ernie-4.5-21b-a3b", num_hidden_layers=layers, moe_layer_end_index=-1,
                      num_nextn_predict_layers=0, param_dtype="bfloat16", dtype="bfloat16")


def write(out: str, layers: int, scheme_name: str) -> None:
    import ernie_jax
    from ernie_jax.quantization.checkpoint import save_quantized
    from ernie_jax.quantization.model import quantize_model, weight_bytes
    from ernie_jax.quantization.scheme import get_scheme

    model = ernie_jax.create_model(_config(layers), seed=0)
    ernie_jax.save_pretrained(model, os.path.join(out, "bf16"))
    scheme = get_scheme(scheme_name)
    q = quantize_model(model, scheme)
    save_quantized(q, os.path.join(out, scheme_name), scheme=scheme)
    stored, bf16 = weight_bytes(q)
    print(json.dumps({"projections_stored": stored, "projections_bf16": bf16}))


def load(path: str, kind: str) -> None:
    import jax
    from flax import nnx

    import ernie_jax
    from ernie_jax.model.create import abstract_model
    from ernie_jax.quantization.checkpoint import load_quantized

    cfg = _config(json.load(open(os.path.join(path, "config.json")))["num_hidden_layers"])
    abstract_model(cfg)  # the floor: jax imported, the model traced abstractly
    floor = _rss_mib()
    model = load_quantized(path) if kind == "quantized" else ernie_jax.from_pretrained(path, dtype="bfloat16")
    loaded = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)))
    print(json.dumps({"floor_mib": floor, "peak_mib": _rss_mib(), "loaded_mib": loaded / 2**20}))


def _run(*args) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "experiments.bench.quantized_load_memory", *args], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_write", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_kind", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._write:
        return write(a._write, a.layers, a.scheme)
    if a._load:
        return load(a._load, a._kind)
    import jax

    from ernie_jax.model import count_params
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        sizes = _run(f"--_write={d}", f"--layers={a.layers}", f"--scheme={a.scheme}")
        files = {k: sum(f.stat().st_size for f in Path(d, k).iterdir()) / 2**20 for k in ("bf16", a.scheme)}
        bf16 = _run(f"--_load={Path(d, 'bf16')}", "--_kind=bf16")
        quant = _run(f"--_load={Path(d, a.scheme)}", "--_kind=quantized")
    n = count_params(_config(a.layers))
    lines = [f"ERNIE-4.5-21B-A3B widths, {a.layers} decoder layers (layer 0 dense), no MTP: {n / 1e9:.2f} B "
             f"parameters; `{a.scheme}` on the decoder projections (the embedding, norms and routers stay bf16). "
             f"Peak RSS of a fresh process loading the checkpoint; floor: the same process after importing jax "
             f"and building the abstract model.", "",
             "| load | files MiB | state MiB | floor RSS MiB | peak RSS MiB | peak − floor MiB |",
             "|---|---|---|---|---|---|"]
    for label, r, f in (("bf16 (`from_pretrained`)", bf16, files["bf16"]),
                        (f"{a.scheme} (`load_quantized`)", quant, files[a.scheme])):
        lines.append(f"| {label} | {f:.0f} | {r['loaded_mib']:.0f} | {r['floor_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] - r['floor_mib']:.0f} |")
    lines += ["", f"Decoder projections: {sizes['projections_stored'] / 2**20:.0f} MiB as stored, "
              f"{sizes['projections_bf16'] / 2**20:.0f} MiB in bf16. RSS counts the checkpoint's pages as the "
              f"safetensors reader maps them in, so a load peaks near state + files; a full-precision copy of the "
              f"quantized projections would add their bf16 (or fp32) size on top. "
              f"{platform.machine()}, jax {jax.__version__}."]
    body = "\n".join(lines)
    print(body)
    if a.out:
        from experiments.bench.report import git_rev, utc_now, write_section
        write_section(a.out, SECTION, body + f" Commit {git_rev()}, {utc_now()}.")


if __name__ == "__main__":
    main()
