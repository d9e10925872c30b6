"""Training launcher (absl): one Python config file per experiment, overridable from the command line.

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=DIR [--config.key=value ...]
    # multi-process: the same command in every process, plus --distributed (Cloud TPU / SLURM: detected)
    # or --coordinator_address=HOST:PORT --num_processes=N --process_id=I

Resumes from DIR/checkpoints when it exists. Writes DIR/metrics.jsonl and TensorBoard events; evaluates on
the held-out split (LM loss and task accuracy by greedy completion) and prints a few continuations (with MTP
weights: decoded speculatively, followed by the draft acceptance rate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import logging as logging_std
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go (required)")
# Required, except in a process that also defines experiments.generate's --hf_dir: that CLI shares this flag
# (one definition lets the CLIs live in one process) and takes --workdir or --hf_dir, checking it itself.
flags.register_validator("workdir", lambda v: v is not None or "hf_dir" in flags.FLAGS,
                         message="--workdir is required")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "no progress bar (logs only)")
# Multi-process (multi-host) runs: every process runs this same command; jax.distributed connects them.
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with the cluster "
                                 "auto-detected (Cloud TPU, SLURM, ...); implied by --coordinator_address")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator, for "
                                   "clusters jax cannot detect; with --num_processes and --process_id")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process' index (with --coordinator_address)")

_TOP_KEYS = {"model", "model_overrides", "mesh", "optimizer", "loss", "data", "total_steps", "micro_batches", "seed",
             "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints", "max_nonfinite",
             "peak_tflops", "eval_every_steps", "eval_examples", "samples", "init_from", "export_hf"}
DATA_KINDS = ("text", "vqa")  # config.data.kind: the embedded text corpus / sources, or the embedded VQA corpus


def _plain(d: Any) -> Any:
    return d.to_dict() if isinstance(d, ConfigDict) else d


def _strict(cls, d: dict, where: str):
    """cls(**d), but an unknown key is an error that names it and lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise app.UsageError(f"config.{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def build(config: ConfigDict):
    """ConfigDict -> (TrainConfig, DataConfig, extras). Every unknown key is an error."""
    import ernie_jax
    from ernie_jax.data import DataConfig
    from ernie_jax.data import synthetic
    from ernie_jax.sharding import MeshConfig
    from ernie_jax.train.loop import TrainConfig
    from ernie_jax.train.optimizer import OptimizerConfig
    from ernie_jax.train.step import LossConfig

    c = _plain(config)
    unknown = sorted(set(c) - _TOP_KEYS)
    if unknown:
        raise app.UsageError(f"config: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    model = ernie_jax.get_preset(c["model"], **_plain(c.get("model_overrides", {})))
    data = dict(_plain(c["data"]))
    kind = data.pop("kind", "text")
    if kind not in DATA_KINDS:
        raise app.UsageError(f"config.data.kind: {kind!r} not in {DATA_KINDS}")
    if kind == "vqa":  # the embedded synthetic VQA corpus (generated into data/vqa/ on first use)
        from ernie_jax.data.multimodal import vqa_data_config
        if model.vision is None:
            raise app.UsageError(f"config.data.kind='vqa' needs a VL model; {c['model']!r} has no vision config")
        data_cfg = vqa_data_config(model, "train", **data)
        heldout = vqa_data_config(model, "heldout", **data)
    elif data.get("sources"):
        data_cfg = DataConfig.from_dict(data)
        heldout = None
    else:  # the embedded default corpus
        data.pop("sources", None)
        data_cfg = synthetic.default_data_config("train", **data)
        heldout = synthetic.default_data_config("heldout", **data)
    check_data_fits_model(model, data_cfg)
    top = {k: c[k] for k in ("total_steps", "micro_batches", "seed", "log_every_steps", "checkpoint_every_steps",
                             "keep_checkpoints", "async_checkpoints", "max_nonfinite", "peak_tflops", "init_from")
           if k in c}
    opt = dict(_plain(c["optimizer"]))
    if "trainable" in opt:
        opt["trainable"] = tuple(opt["trainable"])
    train_cfg = TrainConfig(model=model, mesh=_strict(MeshConfig, _plain(c["mesh"]), "mesh"),
                            optimizer=_strict(OptimizerConfig, opt, "optimizer"),
                            loss=_strict(LossConfig, _plain(c["loss"]), "loss"), **top)
    extras = {"eval_every_steps": c.get("eval_every_steps", 0), "eval_examples": c.get("eval_examples", 0),
              "samples": c.get("samples", 0), "heldout": heldout, "kind": kind,
              "export_hf": bool(c.get("export_hf", False))}
    return train_cfg, data_cfg, extras


def check_data_fits_model(model, data_cfg) -> None:
    """Refuses at start a model that cannot take its data (such a run would train into NaNs or index past its
    tables): token ids past the model's vocabulary (naming the tokenizer), rows longer than its positions,
    and VL special token ids that differ between the model and the data."""
    from ernie_jax.data.tokenizer import SentencePieceTokenizer

    pieces = SentencePieceTokenizer(data_cfg.tokenizer).vocab_size if data_cfg.tokenizer else None
    vocab = data_cfg.vocab_size or pieces
    source = f"the tokenizer {data_cfg.tokenizer} has {pieces} pieces" if pieces else f"data vocab_size={vocab}"
    if vocab is not None and vocab > model.vocab_size:
        raise app.UsageError(f"the data's token ids reach {vocab - 1} ({source}) but the model's vocab_size is "
                             f"{model.vocab_size}: use a model with vocab_size >= {vocab} "
                             "(config.model_overrides.vocab_size) or a smaller tokenizer")
    if data_cfg.pad_id >= model.vocab_size:
        raise app.UsageError(f"config.data.pad_id={data_cfg.pad_id} is outside the model's vocab_size "
                             f"{model.vocab_size}")
    if data_cfg.seq_len > model.max_position_embeddings:
        raise app.UsageError(f"config.data.seq_len={data_cfg.seq_len} exceeds the model's max_position_embeddings="
                             f"{model.max_position_embeddings}")
    for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
                 "video_start_token_id", "video_end_token_id"):
        if hasattr(data_cfg, name) and getattr(data_cfg, name) != getattr(model, name):
            raise app.UsageError(f"data {name}={getattr(data_cfg, name)} but the model's is {getattr(model, name)}")


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of orbax / grain (every checkpoint logs dozens of lines) from absl's handler."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "etils"))


def main(argv):
    del argv
    import jax

    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _DISTRIBUTED.value or _COORDINATOR.value:  # before anything touches a device
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count())

    from ernie_jax.data import make_multimodal_pipeline, make_pipeline
    from ernie_jax.train import evaluation
    from ernie_jax.train.loop import evaluate, train

    train_cfg, data_cfg, extras = build(_CONFIG.value)
    vqa = extras["kind"] == "vqa"
    data = (make_multimodal_pipeline if vqa else make_pipeline)(
        data_cfg, process_index=jax.process_index(), process_count=jax.process_count())
    make_eval_fn = evaluation.make_vqa_eval_fn if vqa else evaluation.make_eval_fn
    print_samples = evaluation.print_vqa_samples if vqa else evaluation.print_samples
    eval_fn = make_eval_fn(data_cfg, extras["heldout"], extras["eval_examples"]) if extras["eval_examples"] else None
    out = train(train_cfg, _WORKDIR.value, data, eval_fn=eval_fn, eval_every_steps=extras["eval_every_steps"],
                progress=not _NO_PROGRESS.value)
    lead = jax.process_index() == 0  # every process computes (collectives), process 0 prints
    if out["stopped_early"]:
        if lead:
            print(f"stopped at step {out['step']} on a signal; checkpoint saved in {_WORKDIR.value}")
        return
    if extras["export_hf"]:  # the next stage of a staged recipe starts from it (config.init_from)
        export_dir = os.path.join(_WORKDIR.value, "hf")
        if jax.process_count() > 1:
            logging.warning("export_hf: multi-process run, not exported; use experiments.export_hf")
        else:
            from ernie_jax.checkpoint.hf import save_pretrained
            save_pretrained(out["model"], export_dir)
            print(f"exported the final weights to {export_dir}")
    if eval_fn is not None:
        final = evaluate(eval_fn, out["model"], out["state"], out["step"])
        if lead:
            print("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
    if extras["samples"]:  # through the engine; with MTP weights, speculatively (the same greedy samples)
        model = out["model"]
        spec = "mtp" if model.config.num_nextn_predict_layers and hasattr(model, "mtp") else None
        mute = contextlib.nullcontext() if lead else contextlib.redirect_stdout(io.StringIO())
        with mute:  # every process computes (collectives), process 0 prints
            stats = print_samples(model, data_cfg, extras["samples"], speculative=spec)
            if spec:
                print(f"speculative decoding (MTP drafts): acceptance rate {stats['acceptance_rate']:.2f}, "
                      f"{stats['tokens_per_forward']:.2f} tokens per forward")


if __name__ == "__main__":
    app.run(main)
