"""The code sandbox: ordinary programs run, and each containment holds against a program that tries to
escape it (wall clock, CPU, memory, processes, network, filesystem, environment, output, file size,
privileges). Each escape test fails when its containment is removed from sandbox.py."""

import os
import shutil
import signal
import socket
import time
import uuid

import pytest

from ernie_jax.reward import SandboxResult, run_python
from ernie_jax.reward.sandbox import REASONS, SandboxUnavailable, sandbox_available


@pytest.fixture(autouse=True, scope="module")
def _needs_sandbox():
    reason = sandbox_available()
    if reason is not None:
        pytest.skip(f"code sandbox unavailable here: {reason}")


def test_ok_program_stdout_stdin_and_stdlib():
    r = run_python("import json, math, sys\nprint(json.dumps({'n': int(sys.stdin.read()) * 2, 'pi': math.pi}))",
                   stdin="21\n", timeout_s=2)
    assert isinstance(r, SandboxResult)
    assert (r.ok, r.reason, r.returncode, r.stderr) == (True, "ok", 0, "")
    assert r.stdout == '{"n": 42, "pi": 3.141592653589793}\n'
    assert 0 < r.wall_s < 2


def test_exit_codes_syntax_errors_and_signals():
    r = run_python("import sys\nprint('partial')\nsys.exit(3)", timeout_s=2)
    assert (r.ok, r.reason, r.returncode, r.stdout) == (False, "exit_code", 3, "partial\n")
    r = run_python("def f(:\n    pass", timeout_s=2)
    assert (r.ok, r.reason, r.returncode) == (False, "exit_code", 1)
    assert "SyntaxError" in r.stderr and "main.py" in r.stderr
    r = run_python("raise ValueError('boom')", timeout_s=2)
    assert r.reason == "exit_code" and "ValueError: boom" in r.stderr
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", timeout_s=2)
    assert (r.ok, r.reason, r.returncode) == (False, "signal", -signal.SIGSEGV)
    assert set(REASONS) >= {"ok", "exit_code", "timeout", "cpu_time", "memory", "output_limit", "signal"}


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(100)"], ids=["busy", "sleep"])
def test_wall_timeout(code):
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1, cpu_s=30)
    assert (r.ok, r.reason, r.returncode) == (False, "timeout", None)
    assert time.monotonic() - t0 < 3


def test_cpu_limit():
    r = run_python("while True:\n    pass", timeout_s=8, cpu_s=1)
    assert (r.ok, r.reason, r.returncode) == (False, "cpu_time", -signal.SIGXCPU)
    # a program that ignores SIGXCPU is killed at the hard limit, a second later
    r = run_python("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
                   timeout_s=8, cpu_s=1)
    assert (r.ok, r.reason, r.returncode) == (False, "cpu_time", -signal.SIGKILL)


def test_memory_limit():
    r = run_python("x = bytearray(1 << 30)\nprint('allocated')", memory_mb=128, timeout_s=5)
    assert (r.ok, r.reason) == (False, "memory")
    assert "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_process_limit_and_no_survivors():
    """A bounded fork loop (bounded so that a broken limit cannot hurt the machine) gets at most
    max_processes, and a daemon that escapes its session does not outlive the call."""
    r = run_python("""
import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
print(n)""", max_processes=8, timeout_s=5)
    assert r.reason == "ok" and 0 < int(r.stdout) < 8
    marker = f"ernie-sandbox-survivor-{uuid.uuid4().hex}"
    code = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-S", "-c",
                 "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(60)", "{marker}"])
    os._exit(0)
time.sleep(0.3)
print(len([p for p in os.listdir("/proc") if p.isdigit()]))"""
    try:
        r = run_python(code, timeout_s=2)
        assert r.reason == "ok" and int(r.stdout) < 10  # its own pid namespace: no host process in sight
        assert _pids_with(marker) == []
    finally:
        for pid in _pids_with(marker):
            os.kill(pid, signal.SIGKILL)


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def test_no_network():
    """Not even a server the test itself listens on at 127.0.0.1 is reachable: a private network namespace."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = run_python(f"""
import socket
for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
    try:
        socket.create_connection(addr, timeout=1).close()
        print("connected", addr)
    except OSError as e:
        print("failed", addr, e.errno)""", timeout_s=5)
    assert r.reason == "ok"
    assert "connected" not in r.stdout and r.stdout.count("failed") == 2


def test_filesystem_read_only_but_for_its_temp_dir(tmp_path):
    target = tmp_path / "escape.txt"
    tmp_path.chmod(0o777)  # only the read-only mount, not file permissions, may stop the write
    shm = f"/dev/shm/ernie-sandbox-{uuid.uuid4().hex}"
    try:
        r = run_python(f"""
import os
for path in [{str(target)!r}, {shm!r}]:
    try:
        open(path, "w").write("escaped")
        print("wrote", path)
    except OSError as e:
        print("failed", e.strerror)
open("inside.txt", "w").write("fine")
print(os.getcwd(), os.environ["HOME"] == os.getcwd(), open("inside.txt").read())""", timeout_s=5)
    finally:  # only there if the containment failed
        if os.path.exists(shm):
            os.remove(shm)
    assert r.reason == "ok", r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["failed Read-only file system"] * 2
    assert not target.exists() and not os.path.exists(shm)
    cwd, home_is_cwd, content = lines[2].split()
    assert (home_is_cwd, content) == ("True", "fine")
    assert not os.path.exists(os.path.dirname(cwd))  # the temp dir is gone after the call


def test_no_parent_environment(monkeypatch):
    monkeypatch.setenv("ERNIE_SANDBOX_TEST_SECRET", "hunter2-secret")
    r = run_python("import os\nprint(sorted(os.environ.items()))", timeout_s=2)
    assert r.reason == "ok"
    assert "hunter2-secret" not in r.stdout and "ERNIE_SANDBOX_TEST_SECRET" not in r.stdout
    assert "'PYTHONHASHSEED', '0'" in r.stdout


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_limit(stream):
    t0 = time.monotonic()
    r = run_python(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000 + '\\n')", timeout_s=3,
                   max_output_bytes=10_000)
    assert (r.ok, r.reason) == (False, "output_limit")
    assert len(getattr(r, stream).encode()) == 10_000
    assert time.monotonic() - t0 < 2.5


def test_file_size_and_disk_limits():
    r = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))", disk_mb=8, timeout_s=5)
    assert r.reason == "exit_code" and "File too large" in r.stderr  # RLIMIT_FSIZE
    r = run_python("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))", disk_mb=8, timeout_s=5)
    assert r.reason == "exit_code" and "No space left on device" in r.stderr  # the tmpfs' size


def test_no_privileges_inside(tmp_path):
    """The program cannot remount its read-only filesystem or make a user namespace of its own."""
    tmp_path.chmod(0o777)
    r = run_python(f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND, CLONE_NEWUSER = 32, 4096, 0x10000000
print(libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None), ctypes.get_errno())
print(libc.unshare(CLONE_NEWUSER), ctypes.get_errno())
try:
    open({str(tmp_path / "remounted")!r}, "w")
    print("wrote")
except OSError as e:
    print(e.strerror)""", timeout_s=5)
    assert r.reason == "ok", r.stderr
    remount, unshare, write = r.stdout.splitlines()
    assert remount.startswith("-1 ") and unshare.startswith("-1 ") and write == "Read-only file system"


def test_unavailable_sandbox_raises(tmp_path, monkeypatch):
    """No silent fallback to running unsandboxed: a missing tool or a failing unshare raises."""
    real = {name: shutil.which(name) for name in ("setpriv", "prlimit", "mount")}
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="unshare"):
        run_python("print(1)")
    for name, path in real.items():
        (tmp_path / name).symlink_to(path)
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="Operation not permitted"):
        run_python("print(1)")
