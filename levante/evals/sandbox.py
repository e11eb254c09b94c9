"""Runs untrusted generated Python where it cannot hurt the machine.

Each run starts a small launcher (this file run as a script, stdlib only) that confines one
Python process and reports on it as one JSON line. The strongest mode this machine allows is
probed once and logged:

- "namespaces" (root, or any user where unprivileged user namespaces are on): new mount, PID,
  network, IPC and UTS namespaces. The program sees a read-only root built from scratch (/usr,
  /etc, the interpreter and four /dev nodes; no /home, /root, /tmp or project tree) and one
  writable size-capped tmpfs, /box, its working directory, which vanishes with it. Its network
  namespace has only a downed loopback. It is PID 1 of its namespace, so when it ends or is
  killed every process it started dies with it, even those that left its process group. Root
  also drops to a throwaway uid, so the process-count limit applies and no root-owned file is
  writable.
- "rlimits" (no namespaces, e.g. Docker's default seccomp profile): a new session and a
  throwaway directory only; network, other files and processes that leave the session are NOT
  isolated, and the probe says so in a warning.

Both modes set rlimits (CPU seconds, address space, file size, open files, processes, no core
files), a wall-clock deadline, no_new_privs, a minimal environment and a cap on the output kept.
Linux >= 5.12 (mount_setattr)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from functools import cache

log = logging.getLogger(__name__)

NAMESPACES, RLIMITS = "namespaces", "rlimits"
BOX = "/box"  # the program's working directory inside the namespace root
_UID_BASE = 1 << 30  # throwaway uids are drawn from [2^30, 2^30 + 2^20)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it)."""


@dataclass(frozen=True)
class Limits:
    wall: float = 10.0  # seconds of wall-clock time for the whole run
    cpu: int = 10  # CPU seconds, per process
    memory: int = 4 << 30  # bytes of address space, per process (EvalPlus's 4 GB)
    processes: int = 32  # processes and threads at once
    disk: int = 64 << 20  # bytes in the work dir, and the largest file anywhere
    output: int = 1 << 20  # bytes of stdout+stderr kept (the first and last halves)


@dataclass(frozen=True)
class Result:
    status: str  # "ok" (exit 0), "error" (other exit), "killed" (a signal: CPU, memory...), "timeout"
    returncode: int  # exit status, or minus the signal number
    output: str  # stdout and stderr together, capped
    seconds: float
    uid: int | None  # the throwaway uid it ran as (root in namespace mode), else None


async def run(source: str, limits: Limits = Limits(), mode: str | None = None) -> Result:
    """Runs `source` as a Python program under `limits`, at most one per CPU at a time."""
    mode = mode or probe()
    async with _slots():
        root = tempfile.mkdtemp(prefix="levante-sandbox-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *_launcher(mode, root, limits),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(source.encode()), limits.wall + 30)
            finally:  # on timeout or cancellation: the program dies with its launcher (PDEATHSIG)
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            return _result(out, err)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@cache
def probe() -> str:
    """The strongest mode that works here, found by running a trivial program; logged once."""
    root = tempfile.mkdtemp(prefix="levante-sandbox-")
    try:
        done = subprocess.run(
            _launcher(NAMESPACES, root, Limits()), input=b"print('ok')", capture_output=True
        )
        result = _result(done.stdout, done.stderr)
        if result.status == "ok" and result.output == "ok\n":
            log.info("sandbox: namespaces (private root, no network, PID namespace, rlimits)")
            return NAMESPACES
        reason = result.output.strip()
    except SandboxError as e:
        reason = str(e)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log.warning(
        "sandbox: namespaces unavailable (%s); generated code runs with rlimits and a wall clock "
        "only: network, files outside its work dir and processes leaving its session are NOT isolated",
        reason,
    )
    return RLIMITS


def _launcher(mode: str, root: str, limits: Limits) -> list[str]:
    config = {"mode": mode, "root": root, "python": sys.executable, "limits": asdict(limits)}
    config["binds"] = sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))})
    return [sys.executable, "-I", "-S", __file__, json.dumps(config)]


def _result(out: bytes, err: bytes) -> Result:
    try:
        report = json.loads(out)
    except ValueError:
        raise SandboxError(f"sandbox launcher failed: {err.decode(errors='replace')[-2000:]}") from None
    if "error" in report:
        raise SandboxError(f"sandbox launcher failed: {report['error']}")
    return Result(**report)


_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _slots() -> asyncio.Semaphore:
    """One program per CPU: they are CPU-bound, and more at once only adds time-limit noise."""
    loop = asyncio.get_running_loop()
    if loop not in _SLOTS:
        _SLOTS[loop] = asyncio.Semaphore(len(os.sched_getaffinity(0)))
    return _SLOTS[loop]


# ---- the launcher: runs as its own process, reads the program on stdin ---------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD = 1, 2, 0x8000, -100
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the tables merged)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEVICES = ("null", "zero", "random", "urandom")


def _libc():  # ctypes is imported here, in the launcher only
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name: str, *args: object) -> None:
        if getattr(libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}: {os.strerror(errno)}")

    def setattr_mount(path: str, recursive: bool, set_: int, clear: int) -> None:
        attr = (ctypes.c_uint64 * 4)(set_, clear, 0, 0)
        flags = ctypes.c_uint(AT_RECURSIVE if recursive else 0)
        call("syscall", SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, attr, ctypes.c_size_t(32))

    return call, setattr_mount


def _build_root(config: dict, program: bytes, uid: int) -> None:
    """In fresh namespaces: a tmpfs root holding read-only binds of what Python needs, /box
    writable, the program at /run.py."""
    call, setattr_mount = _libc()
    root, limits = config["root"], config["limits"]
    call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing below propagates out
    size = len(program) + (4 << 20)
    call("mount", b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=755".encode())
    binds = [p for p in ("/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin") if os.path.lexists(p)]
    for path in binds + config["binds"]:
        target = root + path
        if os.path.lexists(target):
            continue  # already under an earlier bind (a venv inside /usr)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), target)
            continue
        os.makedirs(target, mode=0o755)
        call("mount", path.encode(), target.encode(), None, MS_BIND | MS_REC, None)
    os.mkdir(root + "/dev")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        call("mount", f"/dev/{name}".encode(), f"{root}/dev/{name}".encode(), None, MS_BIND, None)
    box = root + BOX
    os.mkdir(box)
    options = f"size={limits['disk']},mode=700,uid={uid},gid={uid}"
    call("mount", b"tmpfs", box.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    with open(root + "/run.py", "wb") as f:
        f.write(program)
    setattr_mount(root, True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0)
    setattr_mount(box, False, 0, MOUNT_ATTR_RDONLY)


def _enter_namespaces(config: dict, program: bytes) -> int | None:
    """unshare + the private root; returns the uid the program will run as (None: our own)."""
    call, _ = _libc()
    real = os.getuid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    call("unshare", flags | (CLONE_NEWUSER if real else 0))
    if real:  # unprivileged: map ourselves, which grants the capabilities to mount in here
        gid = os.getgid()
        for name, line in (
            ("setgroups", "deny"),
            ("uid_map", f"{real} {real} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
    uid = int.from_bytes(os.urandom(4)) % (1 << 20) + _UID_BASE if real == 0 else None
    _build_root(config, program, real if uid is None else uid)
    return uid


def _confine(config: dict, uid: int | None, output: int) -> None:
    """In the forked child, up to exec: the root, rlimits, the uid, output to the pipe."""
    call, _ = _libc()
    limits, namespaced = config["limits"], config["mode"] == NAMESPACES
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    if namespaced:
        os.chroot(config["root"])
        os.chdir(BOX)
    else:
        os.setsid()
        os.chdir(config["root"])
    for res, value in (
        (resource.RLIMIT_CPU, limits["cpu"]),
        (resource.RLIMIT_AS, limits["memory"]),
        (resource.RLIMIT_FSIZE, limits["disk"]),
        (resource.RLIMIT_NPROC, limits["processes"]),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it


def _supervise(pid: int, fd: int, cap: int, deadline: float, namespaced: bool) -> tuple[bytes, bool]:
    """Reads the program's output (keeping the first and last cap/2 bytes) until it has exited
    and the pipe is closed, or the deadline passes; returns (output, timed_out)."""
    head, tail, dropped = b"", b"", 0
    pidfd = os.pidfd_open(pid)
    watch = {fd, pidfd}
    while watch:
        left = deadline - time.monotonic()
        ready = select.select(list(watch), [], [], max(left, 0))[0] if left > 0 else []
        if not ready:  # PID 1 of a namespace takes every process in it along
            os.kill(pid, signal.SIGKILL) if namespaced else os.killpg(pid, signal.SIGKILL)
            return _join(head, tail, dropped), True
        if pidfd in ready:
            watch.discard(pidfd)
            if not namespaced:  # stragglers left in the session (the zombie keeps its group id)
                os.killpg(pid, signal.SIGKILL)
        if fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                watch.discard(fd)
            room = cap // 2 - len(head)
            head, tail = head + chunk[:room], tail + chunk[room:]
            if len(tail) > cap // 2:
                dropped += len(tail) - cap // 2
                tail = tail[-(cap // 2) :]
    return _join(head, tail, dropped), False


def _join(head: bytes, tail: bytes, dropped: int) -> bytes:
    return head + (f"\n[... {dropped} bytes of output dropped ...]\n".encode() if dropped else b"") + tail


def _launch(config: dict) -> dict:
    program = sys.stdin.buffer.read()
    limits, namespaced = config["limits"], config["mode"] == NAMESPACES
    if namespaced:
        uid = _enter_namespaces(config, program)
        argv = [config["python"], "-s", "/run.py"]
    else:
        uid = None
        with open(os.path.join(config["root"], "run.py"), "wb") as f:
            f.write(program)
        argv = [config["python"], "-s", "run.py"]
    env = {"PATH": "/usr/bin:/bin", "HOME": BOX, "TMPDIR": BOX, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if not namespaced:
        env |= {"HOME": config["root"], "TMPDIR": config["root"]}
    read, write = os.pipe()
    start = time.monotonic()
    pid = os.fork()  # in namespace mode: PID 1 of the new PID namespace
    if pid == 0:
        try:
            _confine(config, uid, write)
            os.execve(argv[0], argv, env)
        except BaseException as e:
            os.write(2, f"sandbox: could not start the program: {e}\n".encode())
        os._exit(127)
    os.close(write)

    output, timed_out = _supervise(pid, read, limits["output"], start + limits["wall"], namespaced)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    state = "timeout" if timed_out else "ok" if code == 0 else "killed" if code < 0 else "error"
    text = output.decode(errors="replace")
    return {
        "status": state,
        "returncode": code,
        "output": text,
        "seconds": time.monotonic() - start,
        "uid": uid,
    }


if __name__ == "__main__":
    try:
        report = _launch(json.loads(sys.argv[1]))
    except Exception as e:  # the launcher's own failure (e.g. unshare refused): one line for the probe
        report = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(report))
