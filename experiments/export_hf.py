"""Exports the latest checkpoint of a training run as a transformers directory (config.json + safetensors).

    python -m experiments.export_hf --workdir=DIR --config=experiments/configs/tiny.py --out=OUT [--ema]
        [--dtype=bfloat16] [--config.mesh.fsdp=...]

`--config` must be the run's config file (with the same `--config.` overrides that change the model or the
EMA, e.g. EMA on/off): it gives the model shape and the train-state layout to restore into. The checkpoint
restores onto this host's devices whatever mesh it was written on (override `--config.mesh.*` when the
config's mesh does not fit here); nothing is allocated before the restore (the target is abstract). The
newest loadable step is used; a truncated or corrupt newer one is named in a warning and skipped. `--ema`
writes the EMA weights (cast to the parameters' dtype) instead of the raw ones. Load the result with
`ernie_jax.from_pretrained(OUT)` or `transformers.AutoModelForCausalLM.from_pretrained(OUT)`.

Single process: the parameters are gathered to this host to be written.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "the run's experiment config file",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory", required=True)
_OUT = flags.DEFINE_string("out", None, "output directory for config.json + safetensors", required=True)
_EMA = flags.DEFINE_bool("ema", False, "export the EMA of the parameters instead of the raw parameters")
_DTYPE = flags.DEFINE_string("dtype", None, "storage dtype of the written tensors (default: the parameters')")


def export(config, workdir: str, out: str, *, ema: bool = False, dtype: str | None = None) -> int:
    """Restores the newest loadable checkpoint of `workdir` (the run of experiment config `config`), writes
    `out`; returns the step exported."""
    import ernie_jax
    from ernie_jax.experiment import load_run
    _, model, step = load_run(config, workdir, ema=ema)
    ernie_jax.save_pretrained(model, out, dtype=dtype)
    return step


def main(argv):
    import jax

    from ernie_jax.experiment import start_cli
    start_cli(argv)
    logging.getLogger("ernie_jax").setLevel(logging.INFO)
    if jax.process_count() > 1:
        raise app.UsageError("export_hf runs in a single process")
    step = export(_CONFIG.value, _WORKDIR.value, _OUT.value, ema=_EMA.value, dtype=_DTYPE.value)
    print(f"exported step {step} of {_WORKDIR.value} ({'EMA' if _EMA.value else 'raw'} weights) to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
