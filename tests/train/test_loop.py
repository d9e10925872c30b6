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
