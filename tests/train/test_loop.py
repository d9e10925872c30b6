"""The loop end to end in subprocesses (4 emulated devices, data=2 x fsdp=2): loss goes down, a kill -9
or SIGTERM and a restart reproduce the uninterrupted run's per-step losses bit for bit."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "loop_script.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       # the five runs compile the same programs: share them through jax's persistent cache
       "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"ernie_jax_test_loop_cache_{os.getuid()}"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(workdir, total, every):
    return subprocess.run([sys.executable, SCRIPT, str(workdir), str(total), str(every)], env=ENV,
                          capture_output=True, text=True, timeout=600)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _start_and_wait_for_step(workdir, total, every, step):
    p = subprocess.Popen([sys.executable, SCRIPT, str(workdir), str(total), str(every)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline:
        if os.path.exists(path) and any(json.loads(x)["step"] >= step for x in open(path)):
            return p
        if p.poll() is not None:
            raise AssertionError(f"run ended early: {p.stderr.read()[-2000:]}")
        time.sleep(0.05)
    p.kill()
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    r = _run(wd, 12, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(wd)


def test_loss_decreases_and_files(straight, tmp_path_factory):
    assert sorted(straight) == list(range(1, 13))
    assert straight[12] < straight[1] - 1.0


def test_kill_9_and_restart_is_bit_exact(straight, tmp_path):
    p = _start_and_wait_for_step(tmp_path, 12, 4, 6)  # checkpoints at 4 (and maybe 8): killed after step >= 6
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = _run(tmp_path, 12, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(tmp_path)  # the restarted run appends steps 5.. again: the last value of each step wins
    assert resumed == straight


def test_sigterm_saves_and_resumes(straight, tmp_path):
    p = _start_and_wait_for_step(tmp_path, 12, 100, 3)  # no periodic checkpoint before the end
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "STOPPED_EARLY" in out, err[-3000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 12
    r = _run(tmp_path, 12, 100)
    assert r.returncode == 0 and "DONE 12" in r.stdout, r.stderr[-3000:]
    assert _losses(tmp_path) == straight


def test_vl_vision_stage_from_export_trains_only_vision_parts(tmp_path, monkeypatch):
    """The staged VL recipe's alignment stage in-process: start from a transformers export (`init_from`), train
    on packed VQA batches with the LM frozen (`trainable`), then evaluate VQA answers by greedy decoding."""
    import jax
    import numpy as np
    from flax import nnx

    from ernie_jax import get_preset, save_pretrained
    from ernie_jax.config import VisionConfig
    from ernie_jax.data import make_multimodal_pipeline, synthetic_vqa
    from ernie_jax.data.multimodal import vqa_data_config
    from ernie_jax.model import create_model
    from ernie_jax.sharding import MeshConfig
    from ernie_jax.train.evaluation import make_vqa_eval_fn
    from ernie_jax.train.loop import TrainConfig, train
    from ernie_jax.train.optimizer import OptimizerConfig
    from ernie_jax.train.step import LossConfig

    monkeypatch.setenv("ERNIE_JAX_VQA_DIR", str(tmp_path / "vqa"))
    synthetic_vqa.generate(tmp_path / "vqa", train_docs=48, heldout_docs=24)
    cfg = get_preset("tiny-vl", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, mrope_section=(3, 3, 2), moe_intermediate_size=(16, 8),
                     vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2))
    save_pretrained(create_model(cfg, seed=5), tmp_path / "init")
    data_kw = dict(seq_len=96, global_batch_size=4, max_patches_per_row=256, max_images_per_row=4, max_docs_per_row=4)
    data = make_multimodal_pipeline(vqa_data_config(cfg, "train", **data_kw))
    trainable = (r"^vision/", r"^adapter/", r"/vision_experts/", r"/vision_router/")
    tc = TrainConfig(model=cfg, mesh=MeshConfig(data=2, fsdp=-1), total_steps=3, checkpoint_every_steps=3,
                     optimizer=OptimizerConfig(peak_lr=1e-2, warmup_steps=0, trainable=trainable),
                     loss=LossConfig(aux_coef=1e-2, aux_free_coef=1e-2, mtp_coef=0.0), init_from=str(tmp_path / "init"))
    out = train(tc, str(tmp_path / "run"), data, progress=False)
    assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"])
    before = dict(nnx.to_flat_state(nnx.state(create_model(cfg, seed=5))))
    changed = set()
    for path, v in nnx.to_flat_state(nnx.state(out["model"])):
        if not np.array_equal(np.asarray(jax.device_get(v.get_value())), np.asarray(before[path].get_value())):
            changed.add("/".join(map(str, path)))
    vision = {p for p in changed if p.startswith(("vision/", "adapter/")) or "/vision_" in p}
    assert vision and any(p.startswith("vision/") for p in vision) and any("vision_experts" in p for p in vision)
    frozen = changed - vision - {p for p in changed if p.endswith("router/bias")}  # biases: aux-free update
    assert "decoder/stacks/1/layers/mlp/vision_router/kernel" in vision
    assert not frozen, sorted(frozen)  # embeddings, attention, text experts, shared experts, norms unchanged
    assert any("vision_router/bias" in p for p in changed)
    # VQA evaluation: held-out loss, per-type accuracy, chance level
    ev = make_vqa_eval_fn(vqa_data_config(cfg, "train", **data_kw), vqa_data_config(cfg, "heldout", **data_kw),
                          n_examples=len(synthetic_vqa.TASKS), lm_batches=1)(out["model"], 3)
    assert np.isfinite(ev["eval/loss"]) and 0 <= ev["eval/accuracy"] <= 1 and 0.25 < ev["eval/chance"] < 0.5
    assert {k for k in ev if k.startswith("eval/acc_")} == {f"eval/acc_{t}" for t in synthetic_vqa.TASKS}
