"""One typed experiment config, loaded strictly from an experiment file's ConfigDict.

`load_experiment(config)` maps the flat keys of an experiment file (`experiments/configs/*.py`, overridden
from the command line with `--config.key=value`) onto typed, validated dataclasses:

    model, model_overrides      -> ErnieConfig (a preset of `ernie_jax.presets` with these fields replaced)
    mesh / optimizer / loss / ema -> MeshConfig / OptimizerConfig / LossConfig / EMAConfig
    total_steps, micro_batches, seed, log_every_steps, checkpoint_every_steps, keep_checkpoints,
    async_checkpoints, max_nonfinite, peak_tflops, init_from -> the loop's TrainConfig
    data (kind + its data config's fields) -> ExperimentData (train / held-out data configs)
    eval_kind, eval_every_steps, eval_examples, samples -> EvalConfig
    export_hf                   -> write the final weights to WORKDIR/hf
    dpo                         -> DPOConfig (preference data only)
    grpo                        -> GRPOConfig (RL with verifiable rewards on chat data)

Every unknown key, at any level, is an error naming it, its path and the known keys; so is a bad value, an
unregistered data / evaluation kind, or data the model cannot take (`check_data_fits_model`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import ernie_jax
from ernie_jax.config import ErnieConfig
from ernie_jax.experiment.data_kinds import ExperimentConfigError, check_data_fits_model, get_kind
from ernie_jax.sharding import MeshConfig
from ernie_jax.train.ema import EMAConfig
from ernie_jax.train.loop import TrainConfig
from ernie_jax.train.optimizer import OptimizerConfig
from ernie_jax.train.step import LossConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentData:
    """The data of an experiment: its registered kind and the train / held-out data configs it built."""

    kind: str
    train: Any  # DataConfig (text) / MultimodalDataConfig (vqa) / a registered kind's config
    heldout: Any = None  # None: no held-out split (e.g. the user's own text sources)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation during and after training (`every_steps` 0: only at the end, `examples` 0: none)
    and `samples` continuations printed at the end, by the registered kind `kind`."""

    kind: str = "text"
    every_steps: int = 0
    examples: int = 0
    samples: int = 0

    def __post_init__(self):
        for name in ("every_steps", "examples", "samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: the training run (model, mesh, optimizer, loss, EMA and the loop's fields), its
    data, its evaluation (with the data it evaluates on: the training data's, or the evaluation kind's own)
    and whether to export the final weights."""

    train: TrainConfig
    data: ExperimentData
    evaluation: EvalConfig
    eval_data: ExperimentData
    export_hf: bool = False
    dpo: Any = None  # DPOConfig of a preference run (data kind `preference`), else None
    grpo: Any = None  # GRPOConfig of an RL run (data kind `chat`: its conversations are the prompts), else None

    @property
    def model(self) -> ErnieConfig:
        return self.train.model

    def make_pipeline(self, *, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        """The training batches of this process (the data kind's pipeline)."""
        return get_kind(self.data.kind).make_pipeline(self.data.train, process_index=process_index,
                                                      process_count=process_count)

    @property
    def objective(self):
        """(the train step's objective or None for the LM loss, the extra batch keys it reads)."""
        if self.dpo is None:
            return None, ()
        from ernie_jax.posttrain.dpo import dpo_objective  # noqa: PLC0415
        return dpo_objective(self.dpo, self.data.train.max_docs_per_row), self.dpo.batch_keys

    def make_eval_fn(self):
        """eval_fn(model, step) -> metrics of the evaluation kind, or None when `evaluation.examples` is 0."""
        if not self.evaluation.examples:
            return None
        return get_kind(self.evaluation.kind).make_eval_fn(self.eval_data.train, self.eval_data.heldout,
                                                           self.evaluation.examples)

    def print_samples(self, model, *, speculative: str | None = None) -> dict:
        """Prints `evaluation.samples` greedy continuations of held-out prompts; returns the decoding counters."""
        return get_kind(self.evaluation.kind).print_samples(model, self.eval_data.train, self.evaluation.samples,
                                                            speculative=speculative)


_SECTIONS: dict[str, type] = {"mesh": MeshConfig, "optimizer": OptimizerConfig, "loss": LossConfig,
                              "ema": EMAConfig}
LOOP_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", *_SECTIONS))
_EVAL_KEYS = {"eval_kind": "kind", "eval_every_steps": "every_steps", "eval_examples": "examples",
              "samples": "samples"}
TOP_KEYS = frozenset({"model", "model_overrides", "data", "export_hf", "dpo", "grpo", *_SECTIONS, *LOOP_KEYS,
                      *_EVAL_KEYS})
_MOVED = {"config.loss.ema_decay": "config.ema.decay", "config.loss.ema_window": "config.ema.window",
          "config.loss.ema_eps": "config.ema.eps"}


def _plain(d: Any) -> Any:
    """A ConfigDict (or a dict of them) as plain dicts / lists."""
    if hasattr(d, "to_dict"):
        return d.to_dict()
    if isinstance(d, Mapping):
        return {k: _plain(v) for k, v in d.items()}
    return d


def _tuples(v: Any) -> Any:
    """Lists (a ConfigDict's sequences) as tuples, as the frozen configs' sequence fields are."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _mapping(d: Any, path: str) -> dict:
    if not isinstance(d, Mapping):
        raise ExperimentConfigError(f"{path} must be a dict of keys, got {d!r}")
    return dict(d)


def _check_keys(d: Mapping[str, Any], known: Any, path: str) -> None:
    """An error naming every key of `d` not in `known` (with `path`, and where a key moved, its new path)."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        moved = [f"{path}.{k} is now {_MOVED[f'{path}.{k}']}" for k in unknown if f"{path}.{k}" in _MOVED]
        hint = f" ({'; '.join(moved)})" if moved else ""
        raise ExperimentConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}{hint}")


def _section(cls: type, d: Any, path: str):
    d = _mapping(d, path)
    _check_keys(d, [f.name for f in dataclasses.fields(cls)], path)
    try:
        return cls(**{k: _tuples(v) for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"{path}: {e}") from None


def _model(c: dict) -> ErnieConfig:
    if "model" not in c:
        raise ExperimentConfigError(f"config.model is required (a preset: {sorted(ernie_jax.PRESETS)})")
    overrides = _mapping(c.get("model_overrides", {}), "config.model_overrides")
    _check_keys(overrides, [f.name for f in dataclasses.fields(ErnieConfig)], "config.model_overrides")
    if c["model"] not in ernie_jax.PRESETS:
        raise ExperimentConfigError(f"config.model: unknown preset {c['model']!r}; known: {sorted(ernie_jax.PRESETS)}")
    try:
        return ernie_jax.get_preset(c["model"], **overrides)
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"config.model_overrides: {e}") from None


def _data(kind_name: str, model: ErnieConfig, options: dict, path: str, model_name: str) -> ExperimentData:
    kind = get_kind(kind_name, f"{path}.kind" if path == "config.data" else path)
    _check_keys(options, {"kind", *(f.name for f in dataclasses.fields(kind.config_class()))}, "config.data")
    options = {k: v for k, v in options.items() if k != "kind"}
    try:
        train, heldout = kind.data_configs(model, options)
    except ExperimentConfigError as e:
        raise ExperimentConfigError(f"{e} (config.model={model_name!r})") from None
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"config.data: {e}") from None
    check_data_fits_model(model, train)
    return ExperimentData(kind=kind_name, train=train, heldout=heldout)


def load_experiment(config: Any) -> ExperimentConfig:
    """The typed experiment of an experiment file's ConfigDict (or a plain dict); every unknown key, bad value,
    unregistered kind, or data the model cannot take is an `ExperimentConfigError` naming the key."""
    c = _mapping(_plain(config), "config")
    _check_keys(c, TOP_KEYS, "config")
    model = _model(c)
    sections = {name: _section(cls, c.get(name, {}), f"config.{name}") for name, cls in _SECTIONS.items()}
    try:
        train = TrainConfig(model=model, **sections, **{k: c[k] for k in LOOP_KEYS if k in c})
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"config: {e}") from None

    options = _mapping(c.get("data", {}), "config.data")
    data = _data(options.get("kind", "text"), model, options, "config.data", c["model"])
    try:
        evaluation = EvalConfig(**{_EVAL_KEYS[k]: c[k] for k in _EVAL_KEYS if k in c and k != "eval_kind"},
                                kind=c.get("eval_kind") or data.kind)
    except (TypeError, ValueError) as e:
        raise ExperimentConfigError(f"config: {e}") from None
    if evaluation.kind == data.kind:
        eval_data = data
    else:  # the evaluation kind's own data, at the training data's shapes
        shapes = {"seq_len": data.train.seq_len, "global_batch_size": data.train.global_batch_size}
        eval_data = _data(evaluation.kind, model, shapes, "config.eval_kind", c["model"])
    return ExperimentConfig(train=train, data=data, evaluation=evaluation, eval_data=eval_data,
                            export_hf=bool(c.get("export_hf", False)), dpo=_dpo(c, data, train),
                            grpo=_grpo(c, data))


def _grpo(c: dict, data: ExperimentData):
    """The `grpo` section of an RL run (chat data: the prompts and their reference answers); None without one."""
    if "grpo" not in c:
        return None
    if data.kind != "chat":
        raise ExperimentConfigError(f"config.grpo needs config.data.kind='chat' (its conversations are the RL "
                                    f"prompts), not {data.kind!r}")
    from ernie_jax.posttrain.grpo import GRPOConfig  # noqa: PLC0415
    return _section(GRPOConfig, c["grpo"], "config.grpo")


def _dpo(c: dict, data: ExperimentData, train: TrainConfig):
    """The `dpo` section of a preference run (defaults when absent); an error anywhere else."""
    if data.kind != "preference":
        if "dpo" in c:
            raise ExperimentConfigError(f"config.dpo is for config.data.kind='preference', not {data.kind!r}")
        return None
    from ernie_jax.posttrain.dpo import DPOConfig  # noqa: PLC0415
    dpo = _section(DPOConfig, c.get("dpo", {}), "config.dpo")
    if dpo.needs_reference and not train.init_from:
        raise ExperimentConfigError(f"config.dpo.loss={dpo.loss!r} needs config.init_from: the model to start "
                                    "from is also the frozen reference")
    return dpo


def check_overrides_once(argv: Sequence[str], flag: str = "config") -> None:
    """A command line that sets a config key twice (`--config.total_steps=1 ... --config.total_steps=2`; the
    flag library keeps the last silently) is an error naming the key."""
    keys = [a[2:].split("=", 1)[0] for a in argv if a.startswith(f"--{flag}.") or a.startswith(f"--{flag}=")]
    twice = sorted(k for k, n in Counter(keys).items() if n > 1)
    if twice:
        raise ExperimentConfigError(f"{', '.join('--' + k for k in twice)} given more than once on the command "
                                    "line: give each key once")
