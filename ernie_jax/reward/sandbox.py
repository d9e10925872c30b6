"""Code sandbox of the post-training reward: run a candidate Python program under kernel-enforced limits.

`run_python(code, stdin=...) -> SandboxResult` writes the program into a fresh temp dir and runs it in a
subprocess contained by the kernel, not by Python-level checks (the program is untrusted: a policy being
trained may learn to game or break anything softer). util-linux `unshare` gives it its own namespaces:
- user: it is root nowhere outside. The parent writes the id maps. Run by root, in-namespace uid 0 is
  real root (only the set-up shell uses it) and the program runs as in-namespace uid 1 = real uid 65534
  (nobody), since RLIMIT_NPROC never applies to real root; it keeps only CAP_DAC_READ_SEARCH (read-only
  access to the interpreter wherever it lives, e.g. under /root). Run by another user, the program is
  that user, mapped to in-namespace root with every capability dropped;
- network: an empty one (loopback down): no connection reaches anything, the host's 127.0.0.1 included;
- mount: every mount remounted read-only, then a `disk_mb` tmpfs (its cwd, HOME, TMPDIR) is the one
  writable place; it vanishes with the namespace, so nothing is written anywhere on the host;
- pid: the program cannot see or signal host processes, and when the namespace's init (the set-up shell,
  which the program cannot signal) exits or is killed, the kernel kills every process left in it;
- ipc, uts; and nested user namespaces are capped at 0 (less kernel surface).
rlimits (prlimit): CPU (SIGXCPU at `cpu_s`, SIGKILL a second later), address space, processes+threads,
file size, open files, no core dumps. The parent enforces the wall clock and caps what it reads of
stdout/stderr (each `max_output_bytes`), killing the process group on either. The environment is built
from scratch: none of the parent's variables reach the program.

Every outcome of the program (syntax error, hang, fork bomb, huge allocation, writes outside its dir,
network attempt) is a `SandboxResult` whose `reason` is one of `REASONS`; only a sandbox that cannot be
set up raises `SandboxUnavailable` (never a silent fallback to running unsandboxed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

OK, EXIT_CODE, TIMEOUT, CPU_TIME, MEMORY, OUTPUT_LIMIT, SIGNAL = (
    "ok", "exit_code", "timeout", "cpu_time", "memory", "output_limit", "signal")
REASONS = (OK, EXIT_CODE, TIMEOUT, CPU_TIME, MEMORY, OUTPUT_LIMIT, SIGNAL)
"""ok: exit 0. exit_code: nonzero exit (syntax errors, uncaught exceptions). timeout: wall clock
(`timeout_s`) ran out. cpu_time: RLIMIT_CPU hit. memory: MemoryError (RLIMIT_AS). output_limit: stdout or
stderr passed `max_output_bytes`. signal: killed by any other signal (e.g. a segfault)."""

_SETUP_S = 10.0  # seconds the namespaces and mounts may take before the sandbox counts as broken
_NOBODY = 65534
# Runs as the namespace's init (pid 1), with $1 the temp dir, $2 the program's in-namespace uid, $3 the
# tmpfs size, then the program's command. Until the program starts, its stdout is the set-up's channel to
# the parent ("R": namespaces made, waiting for the id maps and "go" on stdin; "M": mounts done) and its
# stdin is the parent's "go"; the program reads the stdin file. It does not `exec` the program: pid 1
# would ignore SIGXCPU and its signal-death would look like the shell's.
_SETUP = r"""
printf R; read -r _ || exit 1
echo 0 > /proc/sys/user/max_user_namespaces || exit 1
for m in $(cut -d" " -f5 /proc/self/mountinfo); do
  mount -o remount,bind,ro "$(printf %b "$m")" || exit 1
done
mount -t tmpfs -o "size=$3,mode=0700,uid=$2,gid=$2,nosuid,nodev" sandbox "$1/w" && cd "$1/w" || exit 1
printf M; stdin="$1/stdin"; shift 3
"$@" < "$stdin"; exit $?
"""


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up here (no util-linux, user namespaces disabled, ...)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """One run. ok: exited 0 within every limit. stdout/stderr: decoded UTF-8 (invalid bytes replaced),
    each at most `max_output_bytes` bytes. reason: one of `REASONS`. returncode: the exit status, -N for
    signal N (statuses 129-192 are read as signals, as shells report them), None when the parent killed
    it (timeout, output_limit). wall_s: seconds from the program's start to its end."""
    ok: bool
    stdout: str
    stderr: str
    reason: str
    returncode: int | None
    wall_s: float


def _tools() -> dict[str, str]:
    paths = {name: shutil.which(name) for name in ("unshare", "setpriv", "prlimit", "mount")}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"the code sandbox needs util-linux's {', '.join(missing)} on PATH")
    return paths


def _write_maps(pid: int, root: bool) -> None:
    """Id maps of the new user namespace (see the module doc); written from outside, as root may map
    several ids while an unprivileged user may only map itself."""
    if root:
        uid_map = gid_map = f"0 0 1\n1 {_NOBODY} 1\n"
    else:
        uid_map, gid_map = f"0 {os.geteuid()} 1\n", f"0 {os.getegid()} 1\n"
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, cpu_s: float | None = None,
               memory_mb: int = 256, disk_mb: int = 16, max_output_bytes: int = 64 * 1024,
               max_processes: int = 32, python: str = sys.executable) -> SandboxResult:
    """Run `code` (the text of a Python program) with `stdin`; return its `SandboxResult`.

    timeout_s: wall-clock seconds. cpu_s: CPU seconds per process (default timeout_s; RLIMIT_CPU counts
    whole seconds, so rounded up, at least 1). memory_mb: address space per process (RLIMIT_AS).
    disk_mb: size of the writable tmpfs and largest file (RLIMIT_FSIZE). max_output_bytes: cap on stdout
    and on stderr, each. max_processes: processes and threads the program may hold at once
    (RLIMIT_NPROC, counted per sandbox by its user namespace). python: interpreter, run with -S (the
    standard library only, not the caller's site-packages); not -I, whose -E would drop the fixed
    PYTHONHASHSEED, and the environment is ours alone anyway.
    """
    tools = _tools()
    root = os.geteuid() == 0
    cpu = max(1, math.ceil(timeout_s if cpu_s is None else cpu_s))
    caps = ",+dac_read_search" if root else ""
    tmp = tempfile.mkdtemp(prefix="ernie-sandbox-")
    try:
        work = os.path.join(tmp, "w")  # the tmpfs' mount point: the program's cwd
        os.mkdir(work)
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(tmp, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        # --keep-caps: the set-up shell starts before its uid is mapped, so would lose its in-namespace
        # capabilities at exec; --kill-child: if unshare dies, so does the namespace's init, so the namespace
        cmd = [tools["unshare"], "--user", "--keep-caps", "--net", "--mount", "--pid", "--fork", "--kill-child",
               "--mount-proc", "--ipc", "--uts", "--", "sh", "-c", _SETUP, "sandbox", tmp, "1" if root else "0",
               f"{disk_mb}m", tools["setpriv"], *(["--reuid=1", "--regid=1", "--clear-groups"] if root else []),
               f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}", f"--bounding-set=-all{caps}",
               "--no-new-privs", "--",
               # RLIMIT_NPROC counts the in-namespace processes of the program's uid; run by a non-root
               # user, unshare and the set-up shell share that uid
               tools["prlimit"], f"--cpu={cpu}:{cpu + 1}", f"--as={memory_mb << 20}", f"--fsize={disk_mb << 20}",
               f"--nproc={max_processes + (0 if root else 2)}", "--nofile=64", "--core=0", "--",
               python, "-S", os.path.join(tmp, "main.py")]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": work, "TMPDIR": work,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=tmp, start_new_session=True)
        return _supervise(proc, root, timeout_s, max_output_bytes, cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL unshare and the namespace's init (one process group; the init's death ends the namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _supervise(proc: subprocess.Popen, root: bool, timeout_s: float, cap: int, cpu: int) -> SandboxResult:
    """Hand the namespace its id maps, then read capped output until the program ends, its wall clock
    runs out, or it writes too much; kill the process group (so the namespace) in the last two cases."""
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    deadline, started, killed_for, reaped = time.monotonic() + _SETUP_S, None, None, False
    try:
        while sel.get_map() and killed_for is None:
            left = deadline - time.monotonic()
            if left <= 0:
                killed_for = TIMEOUT if started else "setup timed out"
                break
            for key, _ in sel.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                if started is None and key.fd == proc.stdout.fileno():
                    if data.startswith(b"R"):  # the namespaces exist: map their ids, let the set-up go on
                        try:
                            _write_maps(proc.pid, root)
                            proc.stdin.write(b"go\n")
                            proc.stdin.close()
                        except OSError as e:
                            raise SandboxUnavailable(f"could not map the sandbox's user namespace: {e}") from e
                    if b"M" not in data:
                        continue
                    started = time.monotonic()  # mounts done: the program starts now
                    deadline = started + timeout_s
                    data = data[data.index(b"M") + 1:]
                out[key.fd] += data
                if len(out[key.fd]) > cap:
                    del out[key.fd][cap:]
                    killed_for = OUTPUT_LIMIT
        if killed_for is not None:
            _kill(proc)
        _, status, usage = os.wait4(proc.pid, 0)
        reaped = True
    finally:
        sel.close()
        proc.stdin.close()
        if not reaped:  # an exception: leave nothing running
            _kill(proc)
            proc.wait()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close(), proc.stderr.close()
    stdout, stderr = (bytes(b).decode("utf-8", "replace") for b in out.values())
    if started is None:
        raise SandboxUnavailable(f"the code sandbox could not start ({killed_for or 'exit ' + str(proc.returncode)}"
                                 f" of `unshare --user --net --mount --pid ...` and its mounts): {stderr.strip()}")
    wall_s = time.monotonic() - started
    if killed_for is not None:
        return SandboxResult(False, stdout, stderr, killed_for, None, wall_s)
    code = proc.returncode
    if 128 < code < 128 + signal.NSIG:  # the set-up shell reports a program killed by signal N as 128 + N
        code = -(code - 128)
    if code == 0:
        reason = OK
    elif code < 0:
        # the CPU limit sends SIGXCPU, then SIGKILL at the hard limit if SIGXCPU is caught or ignored
        over_cpu = usage.ru_utime + usage.ru_stime >= cpu
        reason = CPU_TIME if -code == signal.SIGXCPU or (-code == signal.SIGKILL and over_cpu) else SIGNAL
    else:
        reason = MEMORY if "MemoryError" in stderr else EXIT_CODE
    return SandboxResult(reason == OK, stdout, stderr, reason, code, wall_s)


_AVAILABLE: list[str | None] = []


def sandbox_available() -> str | None:
    """None when the sandbox works here, else why not (for callers and tests to skip on); checked once."""
    if not _AVAILABLE:
        try:
            result = run_python("print('ok')", timeout_s=10.0)
            _AVAILABLE.append(None if result.ok and result.stdout == "ok\n" else
                              f"a trivial program failed in the sandbox ({result.reason}): {result.stderr[-500:]}")
        except SandboxUnavailable as e:
            _AVAILABLE.append(str(e))
    return _AVAILABLE[0]
