"""experiments/export_hf.py: on the 2-step tiny run (conftest.py, 8-device mesh), export the checkpoint through
the CLI in a 1-device subprocess (raw and EMA weights), load the exports with `ernie_jax.from_pretrained` and
compare logits with the trained model's."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ernie_jax
from ernie_jax.data import make_pipeline
from ernie_jax.synthetic.text import default_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(ROOT, "experiments", "configs", "tiny.py")  # the `run` fixture's (conftest.py)


@pytest.fixture(scope="module")
def ids():
    return np.asarray(next(make_pipeline(default_data_config("heldout", seq_len=32, global_batch_size=2)))["tokens"])


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


def test_cli_export_raw_weights(run, ids, tmp_path):
    workdir, train_cfg, _, raw, _ = run
    dest = tmp_path / "hf"
    assert f"exported step 2 of {workdir} (raw weights)" in _export_cli(workdir, dest)
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
    loaded = ernie_jax.from_pretrained(dest, dtype="float32")
    assert loaded.config == train_cfg.model
    np.testing.assert_allclose(_logits(loaded, ids), _logits(raw, ids), rtol=1e-5, atol=1e-5)


def test_cli_export_ema_weights(run, ids, tmp_path):
    workdir, _, _, raw, ema_model = run
    dest = tmp_path / "hf_ema"
    assert f"exported step 2 of {workdir} (EMA weights)" in _export_cli(workdir, dest, "--ema")
    loaded = ernie_jax.from_pretrained(dest, dtype="float32")
    want = _logits(ema_model, ids)
    np.testing.assert_allclose(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - _logits(raw, ids)).max() > 1e-3  # the EMA really is other weights
