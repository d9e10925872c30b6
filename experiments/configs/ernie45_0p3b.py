"""ERNIE-4.5-0.3B (dense, 18 layers, hidden 1024, GQA 16/2) pretraining with Baidu's recipe (training doc §8).

    python -m experiments.train --config=experiments/configs/ernie45_0p3b.py --workdir=gs://.../0p3b

Mesh: FSDP (ZeRO-3) over every chip, batch split over the same axis: a 0.36B model needs no tensor or
expert parallelism; e.g. a v5p-64 slice (32 chips) gives 8 rows of 4096 tokens per chip and step.
Numerics: bf16 compute, fp32 master parameters and AdamW state; full remat at 4096 tokens
(docs/tpu_aot.md: ~5x less training scratch); the FlashMask kernel for packed documents (TPU; on GPU
set `--config.model_overrides.attention_impl=xla`).
Optimizer: AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.1, clip 1.0; WSD with 1-sqrt decay, peak 2.2e-4,
min 2.2e-5, 200 warmup steps (the released 300B yaml's values; the small models' own values are not
published). Data: `sources` empty = the embedded corpus (a smoke test of the whole stack); point
`data.sources` and `data.tokenizer` at the real corpus for pretraining.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = "ernie-4.5-0.3b"
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full",
                                    "attention_impl": "flashmask"})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1, "pipeline": 1, "rules": "fsdp"})
    c.optimizer = ConfigDict({"peak_lr": 2.2e-4, "min_lr": 2.2e-5, "warmup_steps": 200, "decay_fraction": 0.1,
                              "decay": "1-sqrt", "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                              "clip_norm": 1.0, "router_lr_multiplier": 1.0})
    c.loss = ConfigDict({"aux_coef": 0.0, "z_coef": 0.0, "orth_coef": 0.0, "mtp_coef": 0.0,
                         "aux_free_coef": 0.0})  # dense, no MTP block
    c.ema = ConfigDict({"decay": 0.0, "window": 1000.0})  # EMA over ~1000 steps
    c.data = ConfigDict({"sources": [], "seq_len": 4096, "global_batch_size": 256})  # 1.05M tokens per step
    c.total_steps = 50_000  # ~52B tokens
    c.micro_batches = 1
    c.seed = 0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.eval_every_steps = 2000
    c.eval_examples = 96
    c.samples = 4
    c.init_from = ""  # e.g. the released transformers checkpoint directory, to continue pre-training from it
    c.export_hf = False
    return c
