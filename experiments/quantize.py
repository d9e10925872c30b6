"""Writes a quantized checkpoint of a trained model (`ernie_jax.quantization`), which `experiments.generate
--quantized=DIR` decodes.

    python -m experiments.quantize --workdir=runs/tiny --scheme=w4a8
    python -m experiments.quantize --workdir=runs/tiny --scheme=w2a16 --method=gptq [--calibration_batches=2]
    python -m experiments.quantize --hf_dir=DIR --scheme=wint2 --out=DIR_W2

Schemes (`ernie_jax.quantization.scheme.PRESETS`): w8a16, w4a16 (groups of 128), w2a16 (groups of 64),
w8a8, w4a8 (experts / MLP int4, the rest int8, int8 activations) and wint2 (FastDeploy's layout: experts of
layers < `--wint2_int4_layers` int4, later experts 2-bit in groups of 64, the rest int8). `--method=gptq`
chooses the codes with GPTQ on Hessians from `--calibration_batches` batches of the run's training data
(needs `--workdir`). The weights come from `--workdir` (the newest loadable checkpoint, `--weights=ema` for
the EMA; `--config` as for `experiments.generate`) or `--hf_dir`. The output (default
WORKDIR/quantized/SCHEME[-gptq]) holds the tokenizer's path of the run, so generate needs no other flag.
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "with --workdir: the run's "
                                          "experiment config file", lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "an experiments.train run's directory (or --hf_dir)")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "a transformers ERNIE-4.5 directory (instead of --workdir)")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", ["raw", "ema"], "with --workdir: the raw parameters or their EMA")
_SCHEME = flags.DEFINE_string("scheme", None, "a quantization scheme preset (ernie_jax.quantization.scheme)")
_METHOD = flags.DEFINE_enum("method", "rtn", ["rtn", "gptq"], "round to nearest, or GPTQ on calibration data")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 2, "with --method=gptq: training batches whose "
                                    "activations give the Hessians")
_WINT2_INT4 = flags.DEFINE_integer("wint2_int4_layers", None, "with --scheme=wint2: experts of layers below this "
                                   "stay int4 (default 7, the released layout)")
_OUT = flags.DEFINE_string("out", None, "output directory (default WORKDIR/quantized/SCHEME[-gptq])")


def _check_flags() -> None:
    if bool(_WORKDIR.value) == bool(_HF_DIR.value):
        raise app.UsageError(f"give exactly one of --workdir (a training run) or --hf_dir (a transformers "
                             f"directory); got --workdir={_WORKDIR.value!r} --hf_dir={_HF_DIR.value!r}")
    if _HF_DIR.value:
        for name in ("config", "weights"):
            if flags.FLAGS[name].present:
                raise app.UsageError(f"--{name} describes a training run: use it with --workdir, not --hf_dir")
    if _HF_DIR.value and not _OUT.value:
        raise app.UsageError("--hf_dir needs --out=DIR (where to write the quantized checkpoint)")
    if _METHOD.value == "gptq" and not _WORKDIR.value:
        raise app.UsageError("--method=gptq calibrates on the run's training data: use --workdir")
    if _CALIBRATION.value < 1:
        raise app.UsageError(f"--calibration_batches must be >= 1, got {_CALIBRATION.value}")
    if not _SCHEME.value:
        raise app.UsageError("--scheme is required (w8a16, w4a16, w2a16, w8a8, w4a8, wint2)")


def main(argv):
    from ernie_jax.experiment import start_cli
    start_cli(argv)
    _check_flags()

    import ernie_jax
    from ernie_jax.quantization.scheme import SchemeError, get_scheme
    from ernie_jax.quantization.model import quantize_model, weight_bytes
    from ernie_jax.quantization.checkpoint import save_quantized
    from ernie_jax.experiment import load_run

    try:
        scheme = get_scheme(_SCHEME.value, method=_METHOD.value, wint2_int4_layers=_WINT2_INT4.value)
    except SchemeError as e:
        raise app.UsageError(f"--scheme: {e}") from None
    extra = {}
    if _WORKDIR.value:
        exp, model, step = load_run(_CONFIG.value, _WORKDIR.value, ema=_WEIGHTS.value == "ema")
        data_cfg = exp.data.train
        extra = {"source": os.path.abspath(_WORKDIR.value), "step": step, "weights": _WEIGHTS.value,
                 "tokenizer": data_cfg.tokenizer and os.path.abspath(data_cfg.tokenizer), "add_bos": data_cfg.add_bos}
        out = _OUT.value or os.path.join(_WORKDIR.value, "quantized",
                                         scheme.name + ("-gptq" if scheme.method == "gptq" else ""))
    else:
        model = ernie_jax.from_pretrained(_HF_DIR.value)
        extra = {"source": os.path.abspath(_HF_DIR.value)}
        out = _OUT.value
    try:
        scheme.layouts(model.config)
    except SchemeError as e:
        raise app.UsageError(f"--scheme={_SCHEME.value}: {e}") from None
    hessians = None
    t0 = time.perf_counter()
    if scheme.method == "gptq":
        import itertools
        from ernie_jax.data import make_pipeline
        from ernie_jax.quantization.calibration import layer_hessians
        hessians = layer_hessians(model, itertools.islice(make_pipeline(data_cfg), _CALIBRATION.value))
        print(f"calibration: Hessians of {len(hessians)} projections from {_CALIBRATION.value} batch(es) of "
              f"{data_cfg.global_batch_size} x {data_cfg.seq_len} tokens")
    try:
        qmodel = quantize_model(model, scheme, hessians=hessians)
    except ValueError as e:  # a layout the weights cannot take (group size, packing)
        raise app.UsageError(f"--scheme={_SCHEME.value}: {e}") from None
    save_quantized(qmodel, out, scheme=scheme, extra=extra)
    stored, bf16 = weight_bytes(qmodel)
    print(f"{scheme.name} ({scheme.method}) in {time.perf_counter() - t0:.1f} s -> {out}: decoder projections "
          f"{stored / 2**20:.2f} MiB, {stored / bf16:.3f}x of bf16 ({bf16 / 2**20:.2f} MiB)")


if __name__ == "__main__":
    logging.getLogger("ernie_jax").setLevel(logging.INFO)
    app.run(main)
