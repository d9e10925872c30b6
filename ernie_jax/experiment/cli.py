"""The common start of the experiment scripts (train, export_hf, generate)."""

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
