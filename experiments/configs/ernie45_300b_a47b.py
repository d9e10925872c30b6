"""ERNIE-4.5-300B-A47B (54 layers, hidden 8192, 64 experts top-8, layers 0-2 dense, MTP depth 1)
pretraining with the released 2016-GPU recipe (training doc §6, §8: `pretrain_2016_gpus.yaml`).

    python -m experiments.train --config=experiments/configs/ernie45_300b_a47b.py --workdir=gs://.../300b

Mesh: expert parallelism 8 (Baidu: EP 8 within a node) and FSDP (ZeRO-3) over the rest, tensor 1 (as
Baidu's TP 1); the batch is split over fsdp x expert. Baidu pipelines 12 stages on H800s; here the layer
stacks are FSDP-sharded instead (`pipeline` 1). E.g. 512 chips (v5p-1024) = fsdp 64 x expert 8: 30
micro-batches of 512 rows, one 4096-token row per chip each (Baidu: micro-batch 1, gradient accumulation
90 over 168 data shards = 15,120 rows; 15,360 here so that it divides power-of-two slices). State per
parameter: fp32 master 4 B + AdamW 8 B + EMA 4 B (~4.8 TB in all, ~9.4 GB per chip at 512 chips).
Numerics: bf16 compute, fp32 master, full remat, FlashMask attention (TPU; on GPU set
`--config.model_overrides.attention_impl=xla`).
Losses: aux 1e-5, aux-loss-free bias update 1e-3, z / orthogonality 0, routers at 0.01x the learning
rate (`moe_gate_lr_ratio`); MTP weight 0.3. Optimizer: AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.1, clip 1.0;
WSD 1-sqrt over 231,084 steps (`wsd:231084`), peak 2.2e-4, min 2.2e-5, 200 warmup steps. Data: `sources`
empty = the embedded corpus (a smoke test); point `data.sources` / `data.tokenizer` at the real corpus.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = "ernie-4.5-300b-a47b"
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full",
                                    "attention_impl": "flashmask", "moe_dispatch": "dropless"})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 8, "tensor": 1, "pipeline": 1, "rules": "fsdp"})
    c.optimizer = ConfigDict({"peak_lr": 2.2e-4, "min_lr": 2.2e-5, "warmup_steps": 200, "decay_fraction": 0.1,
                              "decay": "1-sqrt", "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                              "clip_norm": 1.0, "router_lr_multiplier": 0.01})
    c.loss = ConfigDict({"aux_coef": 1e-5, "z_coef": 0.0, "orth_coef": 0.0, "orth_in_loss": False, "mtp_coef": 0.3,
                         "aux_free_coef": 1e-3})
    c.ema = ConfigDict({"decay": 0.0, "window": 1000.0})
    c.data = ConfigDict({"sources": [], "seq_len": 4096, "global_batch_size": 15_360})  # 62.9M tokens per step
    c.total_steps = 231_084
    c.micro_batches = 30
    c.seed = 0
    c.log_every_steps = 1
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.eval_every_steps = 5000
    c.eval_examples = 96
    c.samples = 4
    c.init_from = ""  # e.g. the released transformers checkpoint directory, to continue pre-training from it
    c.export_hf = False
    return c
