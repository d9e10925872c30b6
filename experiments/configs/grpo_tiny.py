"""RL with verifiable rewards after SFT: GRPO with DAPO's dynamic sampling, clip-higher and token-level loss on
the embedded tasks' chat prompts, the exact-answer verifier as the reward, rollouts from the inference engine.

    python -m experiments.train --config=experiments/configs/grpo_tiny.py --workdir=runs/grpo \\
        --config.init_from=runs/sft/hf
    # plain GRPO: --config.grpo.dynamic_sampling=False --config.grpo.clip_high=0.2
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
    c.grpo = ConfigDict({"group_size": 8, "prompts_per_step": 8, "max_new_tokens": 12, "temperature": 0.8,
                         "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "loss_agg": "token",
                         "dynamic_sampling": True, "max_sampling_rounds": 4, "updates_per_batch": 1,
                         "overlong_buffer": 4, "overlong_penalty": 1.0})
    c.loss.mtp_coef = 0.0  # the GRPO objective replaces the LM loss
    c.optimizer.update({"peak_lr": 3e-5, "min_lr": 3e-6, "warmup_steps": 2, "weight_decay": 0.0})
    c.total_steps = 40
    c.log_every_steps = 1
    c.checkpoint_every_steps = 10
    c.eval_every_steps = 20
    return c
