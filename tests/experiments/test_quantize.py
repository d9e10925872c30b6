"""experiments/quantize.py, run as the command line in a 1-device subprocess on the 2-step tiny run (conftest.py):
it writes the codes `quantize_model` computes for the scheme asked, records the run's tokenizer, calibrates
GPTQ on the run's training data, and refuses bad flags naming them."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ernie_jax.quantization.checkpoint import load_quantized
from ernie_jax.quantization.model import quantize_model
from ernie_jax.quantization.scheme import get_scheme

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(ROOT, "experiments", "configs", "tiny.py")  # the `run` fixture's (conftest.py)


def _quantize_cli(*flags, ok: bool = True):
    cmd = [sys.executable, "-m", "experiments.quantize", *flags]
    # one device (not the suite's 8): the 8-device checkpoint restores onto another mesh
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("ERNIE_TEST_XLA_FLAGS", "")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r.stdout + r.stderr


def _leaves(m) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_cli_writes_the_schemes_codes_and_the_runs_tokenizer(run, tmp_path):
    workdir, _, data_cfg, raw, _ = run
    out = _quantize_cli(f"--workdir={workdir}", f"--config={CONFIG_FILE}", "--config.ema.window=2", "--scheme=w4a8",
                        f"--out={tmp_path / 'q'}")
    assert "w4a8 (rtn) in" in out and f"-> {tmp_path / 'q'}: decoder projections" in out
    got, want = _leaves(load_quantized(tmp_path / "q")), _leaves(quantize_model(raw, get_scheme("w4a8")))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    extra = json.loads((tmp_path / "q" / "quantization.json").read_text())["extra"]
    assert extra["tokenizer"] == os.path.abspath(data_cfg.tokenizer) and extra["step"] == 2


def test_cli_gptq_calibrates_on_the_runs_training_data(run, tmp_path):
    workdir, _, _, raw, _ = run
    out = _quantize_cli(f"--workdir={workdir}", f"--config={CONFIG_FILE}", "--config.ema.window=2", "--scheme=w2a16",
                        "--method=gptq", "--calibration_batches=1", "--config.data.seq_len=32",
                        "--config.data.global_batch_size=8")
    assert "calibration: Hessians of 28 projections from 1 batch(es) of 8 x 32 tokens" in out  # 4 layers x 7
    q = load_quantized(os.path.join(workdir, "quantized", "w2a16-gptq"))  # the default output directory
    rtn = _leaves(quantize_model(raw, get_scheme("w2a16")))
    codes = {k: v for k, v in _leaves(q).items() if k.endswith(".codes")}
    assert len(codes) == 7 and sum(not np.array_equal(v, rtn[k]) for k, v in codes.items()) == 7


@pytest.mark.parametrize("flags, match", [
    (["--hf_dir=/x", "--out=/y", "--scheme=w4a8", "--method=gptq"], "--method=gptq calibrates on the run's "
                                                                     "training data: use --workdir"),
    (["--hf_dir=/x", "--out=/y", "--scheme=w4a8", "--weights=ema"], "--weights describes a training run"),
])
def test_bad_flags_are_usage_errors(flags, match):
    assert match in _quantize_cli(*flags, ok=False)
