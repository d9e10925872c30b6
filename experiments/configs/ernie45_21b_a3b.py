"""ERNIE-4.5-21B-A3B (28 layers, hidden 2560, 64 experts top-6 + 2 shared, layer 0 dense, MTP depth 1)
pretraining with Baidu's recipe (training doc §6, §8).

    python -m experiments.train --config=experiments/configs/ernie45_21b_a3b.py --workdir=gs://.../21b

Mesh: expert parallelism 8 (Baidu: EP 8 within a node) and FSDP (ZeRO-3) over the rest; the batch is split
over both. E.g. 256 chips = fsdp 32 x expert 8, 4 micro-batches of 256 rows: one 4096-token row per chip
per micro-batch (Baidu: micro-batch 1, gradient accumulation). Numerics: bf16 compute, fp32 master
parameters and AdamW state, full remat, FlashMask attention (TPU; on GPU set
`--config.model_overrides.attention_impl=xla`).
Losses (released 300B yaml): aux loss 1e-5, aux-loss-free bias update 1e-3, z / orthogonality 0, routers
at 0.01x the learning rate; MTP weight 0.3. Optimizer: AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.1, clip 1.0;
WSD 1-sqrt, peak 2.2e-4, min 2.2e-5, 200 warmup steps. Data: `sources` empty = the embedded corpus (a
smoke test); point `data.sources` / `data.tokenizer` at the real corpus.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = "ernie-4.5-21b-a3b"
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full",
                                    "attention_impl": "flashmask", "moe_dispatch": "dropless"})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 8, "tensor": 1, "pipeline": 1, "rules": "fsdp"})
    c.optimizer = ConfigDict({"peak_lr": 2.2e-4, "min_lr": 2.2e-5, "warmup_steps": 200, "decay_fraction": 0.1,
                              "decay": "1-sqrt", "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                              "clip_norm": 1.0, "router_lr_multiplier": 0.01})
    c.loss = ConfigDict({"aux_coef": 1e-5, "z_coef": 0.0, "orth_coef": 0.0, "orth_in_loss": False, "mtp_coef": 0.3,
                         "aux_free_coef": 1e-3})
    c.ema = ConfigDict({"decay": 0.0, "window": 1000.0})
    c.data = ConfigDict({"sources": [], "seq_len": 4096, "global_batch_size": 1024})  # 4.2M tokens per step
    c.total_steps = 100_000  # ~420B tokens
    c.micro_batches = 4
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
