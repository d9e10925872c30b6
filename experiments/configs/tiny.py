"""The CPU default: the `tiny` dense preset on the embedded synthetic corpus (arithmetic, algorithmic tasks
and templated text), a few minutes on 2 cores.

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/ernie_tiny
    python -m experiments.train --config=experiments/configs/tiny.py --workdir=... --config.total_steps=2000
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = "tiny"  # a preset of ernie_jax.presets
    # ErnieConfig fields; one MTP depth (trained by loss.mtp_coef) drafts for speculative decoding of the samples
    c.model_overrides = ConfigDict({"max_position_embeddings": 2048, "num_nextn_predict_layers": 1})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1, "pipeline": 1, "rules": "fsdp"})
    c.optimizer = ConfigDict({"peak_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30, "decay_fraction": 0.25,
                              "weight_decay": 0.1, "clip_norm": 1.0})
    c.loss = ConfigDict({"aux_coef": 0.0, "z_coef": 0.0, "orth_coef": 0.0, "mtp_coef": 0.3, "aux_free_coef": 0.0})
    c.ema = ConfigDict({"decay": 0.0, "window": 100.0})  # EMA evaluated beside the raw weights
    # Empty `sources`: the embedded default corpus (generated on first use into data/default/).
    c.data = ConfigDict({"sources": [], "seq_len": 128, "global_batch_size": 16})
    c.total_steps = 600
    c.micro_batches = 1
    c.seed = 0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    c.eval_every_steps = 300
    c.eval_examples = 96  # held-out task prompts scored by greedy completion
    c.samples = 4  # continuations printed at the end
    c.init_from = ""  # a transformers checkpoint dir to start from (when the workdir has no checkpoint)
    c.export_hf = False  # write the final weights to WORKDIR/hf (transformers layout)
    return c
