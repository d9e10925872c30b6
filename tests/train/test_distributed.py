"""A 2-process `jax.distributed` run on localhost (CPU, gloo, 2 devices per process): `train()` with the real
data pipeline trains, a preempted run checkpoints and a second 2-process run resumes from it and finishes
with the per-step losses of an uninterrupted 2-process run, bit for bit (distributed_script.py)."""

import json
import math
import os
import subprocess
import sys

import portpicker
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_script.py")
TOTAL, STOP_AT = 6, 3
TIMEOUT_S = 300


def _run2(workdir, cache, *extra):
    """Runs both processes to the end; returns their (returncode, stdout, stderr)."""
    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "ERNIE_TEST_COMPILE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(port), str(i), str(workdir), str(TOTAL), *map(str, extra)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=TIMEOUT_S)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:  # a process whose peer died waits on the coordinator: do not leave it behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (rc, o, e) in enumerate(out):
        assert rc == 0, f"process {i} exited {rc}:\n{o[-2000:]}\n{e[-4000:]}"
    return out


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")  # the three runs compile the same programs once


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    wd = tmp_path_factory.mktemp("straight")
    out = _run2(wd, cache)
    assert [f"process {i}: DONE {TOTAL}" in o for i, (_, o, _) in enumerate(out)] == [True, True]
    return _losses(wd)


def test_two_processes_train(straight):
    # metrics.jsonl is written by process 0 alone: every step exactly once
    assert [s for s, _ in straight] == list(range(1, TOTAL + 1))
    losses = [v for _, v in straight]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_preempted_run_resumes_bit_exact(straight, tmp_path, cache):
    out = _run2(tmp_path, cache, STOP_AT)  # both processes get a SIGTERM at batch STOP_AT: save, exit 0
    assert [f"process {i}: STOPPED_EARLY {STOP_AT}" in o for i, (_, o, _) in enumerate(out)] == [True, True]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == [STOP_AT]
    assert _losses(tmp_path) == straight[:STOP_AT]

    out = _run2(tmp_path, cache)  # resumes from the checkpoint (train state + data iterator state)
    assert [f"process {i}: DONE {TOTAL}" in o for i, (_, o, _) in enumerate(out)] == [True, True]
    assert _losses(tmp_path) == straight  # steps 1..3 of the first run, 4..6 of the resumed one
