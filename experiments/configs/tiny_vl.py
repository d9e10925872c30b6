"""The tiny multimodal model (`tiny-vl`: 4 layers, modality-isolated experts, a 2-block ViT) trained with the
ERNIE-4.5 staged recipe on the embedded data, on CPU. One file, one stage per argument:

    python -m experiments.train --config=experiments/configs/tiny_vl.py:text   --workdir=runs/tiny_vl_text
    python -m experiments.train --config=experiments/configs/tiny_vl.py:vision --workdir=runs/tiny_vl_vision
    python -m experiments.train --config=experiments/configs/tiny_vl.py:joint  --workdir=runs/tiny_vl_joint

- `text`: text-only pre-training on the embedded text corpus (the vision parts get no data, no gradient);
- `vision`: vision alignment on the VQA corpus (rendered shapes, checkable answers), starting from the text
  stage's export: the LM is frozen, only the ViT, the adapter and the vision experts / routers train;
- `joint`: everything trains on the VQA corpus, token-balanced loss, from the vision stage's export.
Each stage exports its final weights to WORKDIR/hf (transformers layout), which the next stage's
`init_from` reads; point `--config.init_from` elsewhere for other workdirs, or at released weights.
`joint` alone (with `--config.init_from=''`) trains from scratch: the tiny multimodal default, one command
(600 steps on the CPU). The VQA stages report held-out accuracy per question type next to
`eval/chance` (the best image-blind guess over the same questions).

The VQA stages train at a peak LR of 3e-4 (the text stage at 3e-3, like the text default), on the answers only
(the questions are templates): at 3e-3 the answers stay at their prior, at 3e-4 they are learnt within a few
hundred steps. The LR sweep and the accuracy of a `joint` run from scratch: docs/benchmarks.md (design
measurements, tiny-vl training).
"""

from ml_collections import ConfigDict

STAGES = ("text", "vision", "joint")
_VISION_PARAMS = (r"^vision/", r"^adapter/", r"/vision_experts/", r"/vision_router/")


def get_config(stage: str = "joint") -> ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"tiny_vl.py: stage {stage!r} not in {STAGES} (use --config=...tiny_vl.py:STAGE)")
    c = ConfigDict()
    c.model = "tiny-vl"
    c.model_overrides = ConfigDict({})
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "tensor": 1, "pipeline": 1, "rules": "fsdp"})
    vqa = stage != "text"
    c.optimizer = ConfigDict({"peak_lr": 3e-4 if vqa else 3e-3, "min_lr": 3e-5 if vqa else 3e-4,
                              "warmup_steps": 30, "decay_fraction": 0.25,
                              "weight_decay": 0.1, "clip_norm": 1.0, "trainable": []})
    c.loss = ConfigDict({"aux_coef": 1e-3, "z_coef": 0.0, "orth_coef": 0.0, "mtp_coef": 0.0, "aux_free_coef": 1e-3})
    c.ema = ConfigDict({"decay": 0.0, "window": 0.0})  # no EMA
    c.total_steps = 600 if stage == "joint" else 300
    c.micro_batches = 1
    c.seed = 0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.eval_every_steps = 300 if stage == "joint" else 150
    c.eval_examples = 160  # 20 held-out questions per type
    c.samples = 8
    c.export_hf = True
    c.init_from = {"text": "", "vision": "runs/tiny_vl_text/hf", "joint": "runs/tiny_vl_vision/hf"}[stage]
    if stage == "text":
        c.data = ConfigDict({"kind": "text", "sources": [], "seq_len": 128, "global_batch_size": 16})
        c.eval_examples = 48
        c.samples = 4
    else:
        c.data = ConfigDict({"kind": "vqa", "seq_len": 128, "global_batch_size": 16, "max_patches_per_row": 256,
                             "max_images_per_row": 8, "max_docs_per_row": 8, "answer_only_loss": True})
    if stage == "vision":
        c.optimizer.trainable = list(_VISION_PARAMS)
    return c
