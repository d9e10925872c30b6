"""SFT of the CPU default: the `tiny` model trained by `tiny.py`, fine-tuned on the embedded tasks as ERNIE chat
(`User: 12+34=` / `Assistant: 46`), the loss on the assistant turns only, evaluated by greedy chat answers to
held-out prompts. Start from the pre-trained run's export:

    python -m experiments.train --config=experiments/configs/tiny.py --workdir=runs/tiny
    python -m experiments.export_hf --workdir=runs/tiny --out=runs/tiny/hf
    python -m experiments.train --config=experiments/configs/sft_tiny.py --workdir=runs/sft \\
        --config.init_from=runs/tiny/hf
"""

import importlib.util
import os

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("_tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    # the embedded tasks as chat; `sources` (JSONL files of {"messages": [...]}) for your own conversations
    c.data = ConfigDict({"kind": "chat", "sources": [], "seq_len": 128, "global_batch_size": 16})
    c.optimizer.update({"peak_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10})
    c.total_steps = 200
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 100
    c.export_hf = True  # runs/sft/hf: where DPO or RL starts from
    return c
