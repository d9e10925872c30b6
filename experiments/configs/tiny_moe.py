"""A tiny text MoE on the CPU default's data: `tiny`'s decoder with 8 routed experts (top-2) and one shared
expert from layer 1 on (layer 0 stays dense, as in ERNIE-4.5-21B-A3B), a few minutes on 2 cores.

    python -m experiments.train --config=experiments/configs/tiny_moe.py --workdir=/tmp/ernie_tiny_moe
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("_tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.model_overrides.update({"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": (128,),
                              "moe_num_shared_experts": 1, "moe_layer_start_index": 1})
    c.loss.aux_coef = 0.01  # the auxiliary balance loss keeps all eight experts in use
    return c
