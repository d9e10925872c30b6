"""The loop end to end in subprocesses (4 emulated devices, data=2 x fsdp=2): loss goes down, a kill -9
or SIGTERM and a restart reproduce the uninterrupted run's per-step losses bit for bit."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
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


def _saved(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _start_and_wait_for_step(workdir, total, every, step, saved=False):
    """Starts the script and returns once it logged `step` (and, with `saved`, finalized a checkpoint)."""
    p = subprocess.Popen([sys.executable, SCRIPT, str(workdir), str(total), str(every)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline:
        if (os.path.exists(path) and any(json.loads(x)["step"] >= step for x in open(path))
                and (not saved or _saved(workdir))):
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
    return _Losses(_losses(wd), workdir=wd)


class _Losses(dict):
    """step -> loss of a run, and the run's workdir."""

    def __init__(self, losses, workdir):
        super().__init__(losses)
        self.workdir = workdir


def test_loss_decreases_and_files(straight, tmp_path_factory):
    assert sorted(straight) == list(range(1, 13))
    assert straight[12] < straight[1] - 1.0


def _rows(workdir):
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _assert_same_final_state(a, b):
    with np.load(os.path.join(a, "final_state.npz")) as x, np.load(os.path.join(b, "final_state.npz")) as y:
        assert sorted(x) == sorted(y) and any("ema" in k for k in x) and any("opt_state" in k for k in x)
        for k in x:  # params, buffers, optimizer state, EMA, step counters
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_kill_9_and_restart_resumes_bit_exact(straight, tmp_path):
    """The restarted run starts after the last checkpoint (not from scratch: a fresh run would reproduce the
    same losses), logs each later step once, and ends with the uninterrupted run's state bit for bit."""
    # checkpoints at 4 (and maybe 8), written asynchronously: killed after step >= 6 once one is final
    p = _start_and_wait_for_step(tmp_path, 12, 4, 6, saved=True)
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = _saved(tmp_path)[-1]
    assert saved in (4, 8)
    before = len(_rows(tmp_path))
    r = _run(tmp_path, 12, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rows(tmp_path)[before:] == list(range(saved + 1, 13))
    resumed = _losses(tmp_path)  # the restarted run appends steps saved+1.. again: the last value of each wins
    assert resumed == straight
    _assert_same_final_state(tmp_path, straight.workdir)


def test_sigterm_saves_and_resumes(straight, tmp_path):
    p = _start_and_wait_for_step(tmp_path, 12, 100, 3)  # no periodic checkpoint before the end
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "STOPPED_EARLY" in out, err[-3000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 12
    before = len(_rows(tmp_path))
    r = _run(tmp_path, 12, 100)
    assert r.returncode == 0 and "DONE 12" in r.stdout, r.stderr[-3000:]
    assert _rows(tmp_path)[before:] == list(range(saved[0] + 1, 13))
    assert _losses(tmp_path) == straight
    _assert_same_final_state(tmp_path, straight.workdir)


def test_vl_vision_stage_from_export_trains_only_vision_parts(tmp_path, monkeypatch):
    """The staged VL recipe's alignment stage in-process: start from a transformers export (`init_from`), train
    on packed VQA batches with the LM frozen (`trainable`), then evaluate VQA answers by greedy decoding."""
    import jax
    import numpy as np
    from flax import nnx

    from ernie_jax import get_preset, save_pretrained
    from ernie_jax.config import VisionConfig
    from ernie_jax.data import make_multimodal_pipeline
    from ernie_jax.sharding import MeshConfig
    from ernie_jax.synthetic import vqa as synthetic_vqa
    from ernie_jax.synthetic.tasks import make_vqa_eval_fn
    from ernie_jax.synthetic.vqa import vqa_data_config
    from ernie_jax.train.loop import TrainConfig, train
    from ernie_jax.train.optimizer import OptimizerConfig
    from ernie_jax.train.step import LossConfig
    from random_weights import random_model

    monkeypatch.setenv("ERNIE_JAX_VQA_DIR", str(tmp_path / "vqa"))
    synthetic_vqa.generate(tmp_path / "vqa", train_docs=48, heldout_docs=24)
    cfg = get_preset("tiny-vl", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, mrope_section=(3, 3, 2), moe_intermediate_size=(16, 8),
                     vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2),
                     moe_gmm_impl="ragged_dot")  # the fastest to compile on CPU; `bucketed` has its own tests
    init = random_model(cfg, seed=5)  # host-drawn: no initialiser to compile
    save_pretrained(init, tmp_path / "init")
    data_kw = dict(seq_len=96, global_batch_size=4, max_patches_per_row=256, max_images_per_row=4, max_docs_per_row=4)
    data = make_multimodal_pipeline(vqa_data_config(cfg, "train", **data_kw))
    trainable = (r"^vision/", r"^adapter/", r"/vision_experts/", r"/vision_router/")
    tc = TrainConfig(model=cfg, mesh=MeshConfig(data=2, fsdp=-1), total_steps=3, checkpoint_every_steps=3,
                     optimizer=OptimizerConfig(peak_lr=1e-2, warmup_steps=0, trainable=trainable),
                     loss=LossConfig(aux_coef=1e-2, aux_free_coef=1e-2, mtp_coef=0.0), init_from=str(tmp_path / "init"))
    out = train(tc, str(tmp_path / "run"), data, progress=False)
    assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"])
    before = dict(nnx.to_flat_state(nnx.state(init)))
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
                          n_examples=2, lm_batches=1)(out["model"], 3)  # the first two question types
    types = synthetic_vqa.TASKS[:2]
    assert np.isfinite(ev["eval/loss"]) and ev["eval/chance"] == pytest.approx(np.mean([synthetic_vqa.CHANCE[t]
                                                                                        for t in types]))
    per_type = [ev[f"eval/acc_{t}"] for t in types]  # one example per type: accuracy = their mean
    assert {k for k in ev if k.startswith("eval/acc_")} == {f"eval/acc_{t}" for t in types}
    assert ev["eval/accuracy"] == pytest.approx(np.mean(per_type))


class _Counting:
    """Deterministic batches of counting sequences (batch i a function of i alone); raises after `limit`."""

    def __init__(self, rows=16, seq=8, limit=10**9):
        self.i, self.rows, self.seq, self.limit = 0, rows, seq, limit

    def __next__(self):
        if self.i >= self.limit:
            raise AssertionError(f"the loop asked for batch {self.i}: it should have stopped")
        r = np.random.RandomState(self.i)
        self.i += 1
        tok = (r.randint(3, 20, (self.rows, 1)) + np.arange(self.seq + 1)) % 125 + 3
        return {"tokens": tok[:, :-1].astype(np.int32), "targets": tok[:, 1:].astype(np.int32),
                "loss_mask": (r.rand(self.rows, self.seq) > 0.2).astype(np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def _tiny_train_config(**kw):
    import ernie_jax
    from ernie_jax.sharding import MeshConfig
    from ernie_jax.train.loop import TrainConfig
    from ernie_jax.train.optimizer import OptimizerConfig
    from ernie_jax.train.step import LossConfig

    # b1 = b2 = 0 and a large eps: Adam's update is ~ -lr * g / eps, linear in the gradient (a scale shows)
    opt = OptimizerConfig(peak_lr=1.0, warmup_steps=0, b1=0.0, b2=0.0, eps=10.0, weight_decay=0.0, clip_norm=1e9)
    base = dict(model=ernie_jax.get_preset("tiny-test"), mesh=MeshConfig(fsdp=-1), optimizer=opt,
                loss=LossConfig(mtp_coef=0.0), total_steps=2, log_every_steps=1, checkpoint_every_steps=100,
                async_checkpoints=False)
    return TrainConfig(**{**base, **kw})


def test_micro_batches_through_the_loop_equal_one_batch(tmp_path):
    """micro_batches=2 (the loop splits each batch of 16 rows into 2 x 8 and the step averages their
    gradients) ends where micro_batches=1 does, with a gradient-linear optimizer."""
    import jax

    from ernie_jax.train.loop import train

    final = {}
    for n in (1, 2):
        out = train(_tiny_train_config(micro_batches=n), str(tmp_path / str(n)), _Counting(), progress=False)
        assert out["step"] == 2
        final[n] = jax.device_get(out["state"].params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final[2])[0], jax.tree.leaves(final[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    logged = {n: [json.loads(x) for x in open(tmp_path / str(n) / "metrics.jsonl")] for n in (1, 2)}
    for r1, r2 in zip(logged[1], logged[2]):  # the same tokens and (token-balanced) losses
        assert r1["tokens"] == r2["tokens"] and r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)


def test_max_nonfinite_in_a_row_aborts(tmp_path):
    """Weights that make every loss NaN (a NaN final-norm scale, loaded through `init_from`): each step is
    skipped, and the second in a row aborts with a message naming the count and the step."""
    import jax.numpy as jnp

    from ernie_jax import save_pretrained
    from ernie_jax.model import create_model
    from ernie_jax.train.loop import TrainingAborted, train

    cfg = _tiny_train_config(max_nonfinite=2, total_steps=5, init_from=str(tmp_path / "nan"))
    model = create_model(cfg.model, seed=0)
    model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], jnp.nan)
    save_pretrained(model, tmp_path / "nan")
    data = _Counting(limit=3)
    with pytest.raises(TrainingAborted, match="2 non-finite steps in a row at step 0"):
        train(cfg, str(tmp_path / "run"), data, progress=False)
    assert data.i == 2  # aborted after exactly two batches
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        d.isdigit() for d in os.listdir(tmp_path / "run" / "checkpoints"))  # nothing saved from the bad run


def test_ema_evaluation_uses_the_ema_weights():
    """`evaluate` runs eval_fn on the raw weights and on the EMA (keys `ema_*`): with an EMA set apart from the
    params, each sees its own."""
    import jax
    import jax.numpy as jnp
    import optax

    import ernie_jax
    from ernie_jax.model import create_model
    from ernie_jax.train.loop import evaluate
    from ernie_jax.train.step import init_train_state

    model = create_model(ernie_jax.get_preset("tiny-test"), seed=0)
    state = init_train_state(model, optax.sgd(0.1), ema=True)
    state = state.replace(ema=jax.tree.map(lambda p: p + 2.0, state.ema))
    out = evaluate(lambda m, step: {"scale_sum": float(jnp.sum(m.final_norm.scale[...])), "step": step},
                   model, state, 7)
    raw = float(np.sum(np.asarray(state.params["final_norm"]["scale"])))
    assert out["scale_sum"] == pytest.approx(raw) and out["step"] == 7
    assert out["ema_scale_sum"] == pytest.approx(raw + 2.0 * state.params["final_norm"]["scale"].size)
