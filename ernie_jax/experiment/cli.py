"""The common start of the experiment scripts (train, export_hf, generate, quantize), and the restore of a
training run's model that export_hf, generate and quantize share."""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app

from ernie_jax.experiment.config import check_overrides_once
from ernie_jax.experiment.data_kinds import ExperimentConfigError
from ernie_jax.experiment.quiet_logs import quiet_library_logs


def start_cli(argv: Sequence[str]) -> None:
    """No positional arguments, quiet library logs, each `--config.key` given once; a usage error otherwise."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])} (flags are --name=value)")
    quiet_library_logs()
    try:
        check_overrides_once(sys.argv[1:])
    except ExperimentConfigError as e:
        raise app.UsageError(str(e)) from None


def load_run(config, workdir: str, *, ema: bool):
    """(ExperimentConfig, model, step) of the newest loadable checkpoint of the run in `workdir` whose experiment
    config is `config` (a ConfigDict); a usage error naming the flag when either does not load."""
    from ernie_jax.experiment.config import load_experiment
    from ernie_jax.train.restore import RestoreError, restore_model

    try:
        exp = load_experiment(config)
    except ExperimentConfigError as e:
        raise app.UsageError(str(e)) from None
    try:
        model, step = restore_model(exp.train, workdir, ema=ema)
    except RestoreError as e:
        raise app.UsageError(f"--workdir={workdir!r}{' (EMA weights)' if ema else ''}: {e}") from None
    return exp, model, step
