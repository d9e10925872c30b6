"""Experiments: one typed config per run (`load_experiment` of an experiment file's ConfigDict), the registry of
data / evaluation kinds, and the scripts' shared start (`start_cli`: log filter, overrides given once).

    from ernie_jax.experiment import load_experiment
    exp = load_experiment(config)              # ExperimentConfigError naming any unknown key
    out = ernie_jax.train.loop.train(exp.train, workdir, exp.make_pipeline(), eval_fn=exp.make_eval_fn())
"""

from ernie_jax.experiment.cli import load_run, start_cli
from ernie_jax.experiment.config import (EvalConfig, ExperimentConfig, ExperimentData, check_overrides_once,
                                         load_experiment)
from ernie_jax.experiment.data_kinds import (DataKind, ExperimentConfigError, check_data_fits_model, get_kind,
                                             register_kind, registered_kinds)
from ernie_jax.experiment.quiet_logs import QuietLibraries, quiet_library_logs

__all__ = ["DataKind", "EvalConfig", "ExperimentConfig", "ExperimentConfigError", "ExperimentData", "QuietLibraries",
           "check_data_fits_model", "check_overrides_once", "get_kind", "load_experiment", "load_run", "quiet_library_logs",
           "register_kind", "registered_kinds", "start_cli"]
