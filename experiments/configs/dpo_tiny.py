"""DPO after SFT: preference pairs of the embedded tasks (the right answer chosen, a near miss rejected), each
pair one shared-question row, the SFT model as the policy's start and the frozen reference.

    python -m experiments.train --config=experiments/configs/dpo_tiny.py --workdir=runs/dpo \\
        --config.init_from=runs/sft/hf
    # SimPO (no reference model): --config.dpo.loss=simpo --config.dpo.beta=2.0
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("_sft_config", os.path.join(os.path.dirname(__file__),
                                                                              "sft_tiny.py"))
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    c = sft.get_config()
    # `sources`: JSONL files of {"chosen": [...], "rejected": [...]} conversations for your own pairs
    c.data = ConfigDict({"kind": "preference", "sources": [], "seq_len": 128, "global_batch_size": 16})
    c.dpo = ConfigDict({"loss": "dpo", "beta": 0.1, "gamma": 0.5, "nll_coef": 1.0})
    c.loss.mtp_coef = 0.0  # the DPO objective replaces the LM loss
    c.optimizer.update({"peak_lr": 5e-5, "min_lr": 5e-6, "warmup_steps": 10, "weight_decay": 0.0})
    c.total_steps = 100
    return c
