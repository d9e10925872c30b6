"""The training loop: mesh, model, optimizer, data, checkpoints, logging; resumes by itself.

Data: any iterator with `next()` -> dict of numpy arrays [B_local, S] (tokens, targets, loss_mask,
segment_ids, positions), `get_state()` -> JSON-able dict and `set_state(state)`; `ernie_jax.data`'s
pipeline is one. Its state is saved with the train state, so a resumed run sees exactly the batches the
uninterrupted run would have seen, and (everything else being deterministic) the same losses bit for bit.

SIGTERM / SIGINT ask for a checkpoint at the next step boundary and a clean exit (preemption). A step
whose loss or gradient is not finite is skipped; `max_nonfinite` of them in a row abort the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ernie_jax.checkpoint.orbax import Checkpointer
from ernie_jax.config import ErnieConfig
from ernie_jax.model import count_params, create_model
from ernie_jax.sharding import MeshConfig, activate, logical_to_spec, make_mesh, resolve_rules, sharding_table
from ernie_jax.train.flops import device_peak_tflops, flops_per_token, measure_peak_tflops
from ernie_jax.train.ema import EMAConfig
from ernie_jax.train.optimizer import OptimizerConfig, make_optimizer
from ernie_jax.train.step import (BATCH_KEYS, VL_KEYS, LossConfig, Objective, TrainState, init_train_state,
                                  make_train_step, merge_model)
from ernie_jax.train.tensorboard import EventWriter

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ErnieConfig
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    ema: EMAConfig = EMAConfig()
    total_steps: int = 100
    micro_batches: int = 1  # gradient accumulation: the per-process batch is split into this many
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_nonfinite: int = 5
    peak_tflops: float = 0.0  # per device; 0 = from the device kind, or measured on CPU
    # A transformers checkpoint directory (e.g. the `hf/` export of an earlier stage, or released weights)
    # to start from when the workdir has no checkpoint yet; optimizer, EMA and data start fresh.
    init_from: str = ""

    def __post_init__(self):
        for name in ("total_steps", "micro_batches", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard events; only process 0 writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = EventWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, metrics)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag read at step boundaries."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing at the next step boundary, then exiting", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _flatten_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class Run:
    """What a training run starts from (`start_run`): its mesh and rules, checkpointer, model (the module whose
    graph and shardings the steps use), optimizer and schedule, the train state (fresh or restored) and the
    restored data state (None on a fresh start)."""

    mesh: Any
    rules: Any
    ckpt: Checkpointer
    model: nnx.Module
    tx: Any
    schedule: Any
    state: TrainState
    data_state: Any


def start_run(cfg: TrainConfig, workdir: str) -> Run:
    """The mesh, the model (created, or `cfg.init_from`'s weights when the workdir has no checkpoint), the
    optimizer and the train state, restored from the newest checkpoint of workdir when there is one; the one
    place a run's state is built (pre-training, SFT, DPO and RL loops alike)."""
    mesh = make_mesh(cfg.mesh)
    rules = resolve_rules(cfg.mesh)
    log.info("resolved config:\n%s", cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints)
    if cfg.init_from and not ckpt.all_steps():
        from ernie_jax.checkpoint.hf import from_pretrained  # noqa: PLC0415
        log.info("initialising from %s", cfg.init_from)
        model = from_pretrained(cfg.init_from, config=cfg.model, mesh=mesh, rules=rules)
    else:
        model = create_model(cfg.model, seed=cfg.seed, mesh=mesh, rules=rules)
    log.info("parameters: %s\n%s", f"{count_params(cfg.model):,}", sharding_table(nnx.state(model), mesh, rules))
    tx, schedule = make_optimizer(cfg.optimizer, cfg.total_steps)
    state = init_train_state(model, tx, ema=cfg.ema.enabled)
    restored = ckpt.restore(state, with_data=True)
    if restored is None and ckpt.all_steps():  # never train over checkpoints of another run silently
        raise RuntimeError(f"none of the checkpoints {ckpt.all_steps()} in {ckpt.directory} can be restored into "
                           "this config's train state (see the warnings above); refusing to start over on top of "
                           "them: use another --workdir or remove them")
    data_state = None
    if restored is not None:
        step0, state, data_state = restored
        log.info("resumed from step %d of %s", step0, ckpt.directory)
    return Run(mesh, rules, ckpt, model, tx, schedule, state, data_state)


def train(cfg: TrainConfig, workdir: str, data: Iterator[dict], *,
          eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None,
          eval_every_steps: int = 0, progress: bool = True, objective: Objective | None = None,
          batch_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trains until cfg.total_steps (resuming from workdir/checkpoints if there is one). Returns a summary:
    final step, last metrics, whether it stopped early on a signal, and the final model.

    objective / batch_keys: a post-training objective in place of the LM loss and the extra batch keys it
    reads (`make_train_step`)."""
    run = start_run(cfg, workdir)
    mesh, rules, ckpt, model, tx, schedule, state = (run.mesh, run.rules, run.ckpt, run.model, run.tx, run.schedule,
                                                     run.state)
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    if run.data_state is not None:
        data.set_state(run.data_state)
    start = int(state.step)

    with activate(mesh, rules):
        step_fn = jax.jit(make_train_step(model, tx, schedule, cfg.loss, ema_cfg=cfg.ema, objective=objective,
                                          batch_keys=batch_keys), donate_argnums=0,
                          out_shardings=(state_shardings, None))
    peak = cfg.peak_tflops or device_peak_tflops(jax.devices()[0]) or measure_peak_tflops()
    writer = MetricsWriter(workdir)
    summary: dict[str, Any] = {"stopped_early": False}
    metrics: dict[str, float] = {}
    bar = tqdm(total=cfg.total_steps, initial=start, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    t_last, tokens_since, steps_since = time.perf_counter(), 0.0, 0
    with StopRequest() as stop:
        step = start
        while step < cfg.total_steps:
            batch = global_batch(next(data), mesh, rules, cfg.micro_batches, batch_keys)
            with activate(mesh, rules):
                state, m = step_fn(state, batch)
            step = int(state.step) if int(m["skipped"]) == 0 else step  # a skipped step does not advance
            if int(m["skipped"]):
                metrics = _flatten_metrics(m)
                log.warning("non-finite loss or gradient: update skipped (%d in a row, %d in all)",
                            int(m["nonfinite_run"]), int(state.nonfinite_total))
                if int(m["nonfinite_run"]) >= cfg.max_nonfinite:
                    ckpt.close()
                    raise TrainingAborted(f"{cfg.max_nonfinite} non-finite steps in a row at step {step}: "
                                          "lower the learning rate or check the data (see metrics.jsonl)")
                continue
            bar.update(1)
            tokens_since += batch["tokens"].size
            steps_since += 1
            if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                metrics = _flatten_metrics(m)
                dt = time.perf_counter() - t_last
                tps = tokens_since / dt
                seq = batch["tokens"].shape[-1]
                metrics.update(tokens_per_s=tps, mfu=tps * flops_per_token(cfg.model, seq) / (
                    peak * 1e12 * jax.device_count()), step_time_s=dt / steps_since)
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{metrics['mfu']:.1%}")
                t_last, tokens_since, steps_since = time.perf_counter(), 0.0, 0
            if eval_fn is not None and eval_every_steps and step % eval_every_steps == 0:
                writer.write(step, evaluate(eval_fn, model, state, step))
            if step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps or stop.requested:
                ckpt.save(step, state, data.get_state())
            if stop.requested:
                summary["stopped_early"] = True
                break
    bar.close()
    ckpt.close()
    writer.close()
    summary.update(step=step, metrics=metrics, model=state_model(model, state), state=state)
    return summary


def evaluate(eval_fn: Callable[[nnx.Module, int], dict[str, float]], model: nnx.Module, state: TrainState,
             step: int) -> dict[str, float]:
    """eval_fn on the raw weights, and on the EMA weights (keys prefixed `ema_`) when there is an EMA."""
    out = eval_fn(state_model(model, state), step)
    if state.ema is not None:
        out.update({f"ema_{k}": v for k, v in eval_fn(state_model(model, state, ema=True), step).items()})
    return out


def state_model(model: nnx.Module, state: TrainState, ema: bool = False) -> nnx.Module:
    """`model`'s module holding the state's raw (or EMA) parameters: the state's own arrays, nothing copied."""
    graphdef, abs_params, abs_buffers = nnx.split(nnx.eval_shape(lambda: model), nnx.Param, ...)
    params = state.ema if ema else state.params
    return merge_model(graphdef, abs_params, abs_buffers, params, state.buffers)


def global_batch(local: dict[str, np.ndarray], mesh, rules, micro_batches: int,
                 extra_keys: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Per-process [B_local, S, ...] numpy -> global [A, B / A, S, ...] arrays sharded over the batch axes
    (and the length axis for [B, S] arrays; VL pixel values [B, P, D] and grids [B, N, 3] by rows only)."""
    out = {}
    for k in BATCH_KEYS + VL_KEYS + tuple(extra_keys):
        if k not in local:
            continue
        a = np.asarray(local[k])
        b, *rest = a.shape
        if b % micro_batches:
            raise ValueError(f"per-process batch {b} is not divisible by micro_batches={micro_batches}")
        a = a.reshape(micro_batches, b // micro_batches, *rest)
        names = ("act_batch", "act_length") if len(rest) == 1 else ("act_batch",) + (None,) * len(rest)
        spec = P(None, *logical_to_spec(names, (a.shape[1] * jax.process_count(), *rest), dict(mesh.shape), rules))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), a)
    return out
