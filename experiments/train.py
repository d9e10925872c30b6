"""Training launcher (absl): one Python config file per experiment, overridable from the command line.

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=DIR [--config.key=value ...]
    # multi-process: the same command in every process, plus --distributed (Cloud TPU / SLURM: detected)
    # or --coordinator_address=HOST:PORT --num_processes=N --process_id=I

The file's keys load into one typed `ernie_jax.experiment.ExperimentConfig` (`load_experiment`): an unknown
key at any level, a bad value, an unregistered data / evaluation kind, data the model cannot take, or a
`--config.` key given twice is a usage error naming it, before anything trains.

Resumes from DIR/checkpoints when it exists. Writes DIR/metrics.jsonl and TensorBoard events; evaluates on
the held-out split (LM loss and task accuracy by greedy completion) and prints a few continuations (with MTP
weights: decoded speculatively, followed by the draft acceptance rate).
"""

from __future__ import annotations

import contextlib
import io
import os

from absl import app, flags, logging
from ml_collections import config_flags

# New keys are let through the flag parser so that the loader names them (with the known ones) as errors.
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "experiment config file",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", required=True)
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "no progress bar (logs only)")
# Multi-process (multi-host) runs: every process runs this same command; jax.distributed connects them.
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with the cluster "
                                 "auto-detected (Cloud TPU, SLURM, ...); implied by --coordinator_address")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator, for "
                                   "clusters jax cannot detect; with --num_processes and --process_id")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process' index (with --coordinator_address)")


def _load():
    """The typed experiment of --config (with its overrides); a bad config is a usage error naming the key."""
    from ernie_jax.experiment import ExperimentConfigError, load_experiment
    try:
        return load_experiment(_CONFIG.value)
    except ExperimentConfigError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    from ernie_jax.experiment import start_cli
    start_cli(argv)
    exp = _load()  # before anything touches a device: a bad config fails fast
    import jax

    if _DISTRIBUTED.value or _COORDINATOR.value:  # before anything touches a device
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                     jax.local_device_count(), jax.device_count())

    from ernie_jax.train.loop import evaluate, train

    data = exp.make_pipeline(process_index=jax.process_index(), process_count=jax.process_count())
    objective, batch_keys = exp.objective
    if exp.dpo is not None and exp.dpo.needs_reference:  # the frozen reference scores each batch once
        from ernie_jax.checkpoint.hf import from_pretrained
        from ernie_jax.posttrain.dpo import WithReference
        data = WithReference(data, from_pretrained(exp.train.init_from, config=exp.model),
                             exp.data.train.max_docs_per_row)
    eval_fn = exp.make_eval_fn()
    if exp.grpo is not None:  # RL with verifiable rewards: the chat data's conversations are the prompts
        from ernie_jax.data.tokenizer import SentencePieceTokenizer
        from ernie_jax.posttrain import chat
        from ernie_jax.posttrain.rl_loop import chat_prompts, exact_answer_rewards, train_grpo
        tok = SentencePieceTokenizer(exp.data.train.tokenizer)
        out = train_grpo(exp.train, exp.grpo, _WORKDIR.value, chat_prompts(exp.data.train), exact_answer_rewards(),
                         tok, encode=lambda e: chat.prompt(e["messages"], tok).tolist(), eval_fn=eval_fn,
                         eval_every_steps=exp.evaluation.every_steps, progress=not _NO_PROGRESS.value)
    else:
        out = train(exp.train, _WORKDIR.value, data, eval_fn=eval_fn, eval_every_steps=exp.evaluation.every_steps,
                    progress=not _NO_PROGRESS.value, objective=objective, batch_keys=batch_keys)
    lead = jax.process_index() == 0  # every process computes (collectives), process 0 prints
    if out["stopped_early"]:
        if lead:
            print(f"stopped at step {out['step']} on a signal; checkpoint saved in {_WORKDIR.value}")
        return
    if exp.export_hf:  # the next stage of a staged recipe starts from it (config.init_from)
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
    if exp.evaluation.samples:  # through the engine; with MTP weights, speculatively (the same greedy samples)
        model = out["model"]
        spec = "mtp" if model.config.num_nextn_predict_layers and hasattr(model, "mtp") else None
        mute = contextlib.nullcontext() if lead else contextlib.redirect_stdout(io.StringIO())
        with mute:  # every process computes (collectives), process 0 prints
            stats = exp.print_samples(model, speculative=spec)
            if spec:
                print(f"speculative decoding (MTP drafts): acceptance rate {stats['acceptance_rate']:.2f}, "
                      f"{stats['tokens_per_forward']:.2f} tokens per forward")


if __name__ == "__main__":
    app.run(main)
