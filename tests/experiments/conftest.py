"""A 2-step run of the tiny config that the generate and quantize CLI tests share."""

import importlib.util
import os

import jax
import pytest

from ernie_jax.experiment import load_experiment
from ernie_jax.train.loop import train
from ernie_jax.train.step import merge_model, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(ROOT, "experiments", "configs", "tiny.py")


def _config():
    spec = importlib.util.spec_from_file_location("_config_file", CONFIG_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.update({"total_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1, "peak_tflops": 1.0})
    c.optimizer.warmup_steps = 1
    c.ema.window = 2.0  # the EMA differs from the raw weights after 2 steps; the file's state layout
    c.data.seq_len, c.data.global_batch_size = 32, 8
    return c


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A 2-step tiny run (MTP block included): (workdir, train config, data config, raw model, EMA model)."""
    workdir = tmp_path_factory.mktemp("run")
    exp = load_experiment(_config())
    train_cfg, data_cfg = exp.train, exp.data.train
    out = train(train_cfg, str(workdir), exp.make_pipeline(), progress=False)
    assert out["step"] == 2 and out["model"].config.num_nextn_predict_layers == 1
    graphdef, p, b = split_model(jax.eval_shape(lambda: out["model"]))
    ema = jax.tree.map(lambda e, x: e.astype(x.dtype), out["state"].ema, out["state"].params)
    return workdir, train_cfg, data_cfg, out["model"], merge_model(graphdef, p, b, ema, out["state"].buffers)


