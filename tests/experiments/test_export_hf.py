"""experiments/export_hf.py: train 2 steps of the tiny config (8-device mesh), export the checkpoint through
the CLI in a 1-device subprocess (raw and EMA weights), load the exports with `ernie_jax.from_pretrained` and
compare logits with the trained model's."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ernie_jax
from ernie_jax.data import make_pipeline
from ernie_jax.experiment import load_experiment
from ernie_jax.synthetic.text import default_data_config
from ernie_jax.train.loop import train
from ernie_jax.train.restore import model_from_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(ROOT, "experiments", "configs", "tiny.py")
OVERRIDES = {"total_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1, "peak_tflops": 1.0}


def _load_config(path):
    spec = importlib.util.spec_from_file_location("_config_file", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _config():
    c = _load_config(CONFIG_FILE)
    c.update(OVERRIDES)
    c.optimizer.warmup_steps = 1
    c.ema.window = 2.0  # decay e^(-1/2): the EMA differs from the raw weights after 2 steps
    c.data.seq_len, c.data.global_batch_size = 32, 8
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    exp = load_experiment(_config())
    out = train(exp.train, str(workdir), exp.make_pipeline(), progress=False)
    assert out["step"] == 2
    ids = np.asarray(next(make_pipeline(default_data_config("heldout", seq_len=32, global_batch_size=2)))["tokens"])
    return workdir, out, ids


def _logits(model, ids):
    return np.asarray(jax.device_get(model(jax.numpy.asarray(ids)).logits))


def _export_cli(workdir, dest, *flags):
    cmd = [sys.executable, "-m", "experiments.export_hf", f"--workdir={workdir}", f"--config={CONFIG_FILE}",
           f"--out={dest}", "--config.ema.window=2", *flags]  # the file's other values: same state layout
    # one device (not the suite's 8): the 8-device checkpoint restores onto another mesh
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("ERNIE_TEST_XLA_FLAGS", "")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_cli_export_raw_weights(trained, tmp_path):
    workdir, out, ids = trained
    dest = tmp_path / "hf"
    assert f"exported step 2 of {workdir} (raw weights)" in _export_cli(workdir, dest)
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
    loaded = ernie_jax.from_pretrained(dest, dtype="float32")
    assert loaded.config == load_experiment(_config()).model
    np.testing.assert_allclose(_logits(loaded, ids), _logits(out["model"], ids), rtol=1e-5, atol=1e-5)


def test_cli_export_ema_weights(trained, tmp_path):
    workdir, out, ids = trained
    dest = tmp_path / "hf_ema"
    assert f"exported step 2 of {workdir} (EMA weights)" in _export_cli(workdir, dest, "--ema")
    loaded = ernie_jax.from_pretrained(dest, dtype="float32")
    ema_model = model_from_state(out["model"], out["state"], ema=True)
    want = _logits(ema_model, ids)
    np.testing.assert_allclose(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - _logits(out["model"], ids)).max() > 1e-3  # the EMA really is other weights
