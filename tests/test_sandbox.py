"""The sandbox against hostile generated code: every attack fails, the host is untouched
afterwards (the file the test owns is still there, nothing was written or connected to, no
process survives), and the harness goes on to score the next sample."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from levante.evals import sandbox
from levante.evals.code import HumanEvalPlus, score
from levante.evals.suite import Options

LIMITS = sandbox.Limits(wall=4, cpu=8, memory=1 << 30, output=4096)
QUICK = sandbox.Limits(wall=2, cpu=4, memory=1 << 30, output=4096)  # where only a loop meets the wall

PROBLEM = {
    "task_id": "HumanEval/sandbox",
    "prompt": 'def add(a: int, b: int) -> int:\n    """a + b"""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "base_input": [[1, 2]],
    "plus_input": [[-1, 1]],
    "atol": 0,
}
GOOD = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real socket listening on loopback, for code that tries to phone out."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def attacks(tmp_path: Path, port: int) -> dict[str, str]:
    """Solutions of `add` that would pass if their attack worked."""
    victim, outside = tmp_path / "victim.txt", tmp_path / "escaped.txt"
    return {
        # ignores the per-test alarm, so only the sandbox's wall clock can stop it
        "infinite loop": "import signal\ndef add(a, b):\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "    while True:\n        pass\n",
        "memory bomb": "def add(a, b):\n    return len('x' * (1 << 36))\n",  # 64 GiB, written
        "fork bomb": "import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n"
        "            os.setsid()\n        except OSError:\n            pass\n",
        "network": "import socket\ndef add(a, b):\n"
        f"    socket.create_connection(('127.0.0.1', {port}), 2).sendall(b'x')\n    return a + b\n",
        "write outside": f"def add(a, b):\n    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",
        "rm": f"import os\ndef add(a, b):\n    assert os.system('rm {victim}') == 0\n    return a + b\n",
    }


def host_untouched(tmp_path: Path, listener: socket.socket) -> None:
    assert (tmp_path / "victim.txt").read_text() == "mine"
    assert not (tmp_path / "escaped.txt").exists()
    with pytest.raises(BlockingIOError):
        listener.accept()


def processes_of(uid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        if any(line.split()[1] == str(uid) for line in status.splitlines() if line.startswith("Uid:")):
            pids.append(int(pid))
    return pids


def test_each_attack_fails_as_a_sample_and_the_harness_goes_on(
    tmp_path: Path, listener: socket.socket
) -> None:
    (tmp_path / "victim.txt").write_text("mine")
    suite = HumanEvalPlus(Options())
    codes = [*attacks(tmp_path, listener.getsockname()[1]).values(), GOOD]

    async def score_all() -> list[dict]:
        return await asyncio.gather(*(score(suite.job(PROBLEM, code), LIMITS) for code in codes))

    *hostile, good = asyncio.run(score_all())
    names = list(attacks(tmp_path, 0))
    assert all(r["base"] in ("fail", "timeout") for r in hostile), list(zip(names, hostile, strict=True))
    assert hostile[0]["base"] == "timeout"  # the loop that ignores the alarm met the wall clock
    assert "MemoryError" in hostile[1]["error"]
    assert "Network is unreachable" in hostile[3]["error"]
    assert good == {"base": "pass", "plus": "pass", "error": None}
    host_untouched(tmp_path, listener)


@pytest.fixture(scope="module")
def mode() -> str:
    """The strongest mode this machine allows; the tests below need namespaces for network and
    file isolation, which root in this container has."""
    return sandbox.probe()


def run(source: str, mode: str = sandbox.NAMESPACES, limits: sandbox.Limits = LIMITS) -> sandbox.Result:
    return asyncio.run(sandbox.run(source, limits, mode))


def test_probe_finds_namespaces_here(mode: str) -> None:
    assert mode == sandbox.NAMESPACES


@pytest.mark.parametrize(
    "attack", ["infinite loop", "memory bomb", "fork bomb", "network", "write outside", "rm"]
)
def test_attack_as_a_program(attack: str, tmp_path: Path, listener: socket.socket, mode: str) -> None:
    (tmp_path / "victim.txt").write_text("mine")
    result = run(attacks(tmp_path, listener.getsockname()[1])[attack] + "print(add(1, 2))\n", mode, QUICK)
    assert result.status in ("error", "timeout", "killed"), result
    assert result.uid is not None and processes_of(result.uid) == []  # the bombs went with it
    host_untouched(tmp_path, listener)


SYSTEM = {"usr", "etc", "bin", "lib", "lib64", "sbin", "dev", "box", "run.py"}


def test_a_private_root_and_an_unprivileged_uid(mode: str) -> None:
    """The root holds the system folders, /box, and the path down to this interpreter's own
    folders (a venv may live under /tmp or /home): nothing else of those trees shows."""
    source = "import json, os\nopen('note', 'w').write('kept')\nroot = os.listdir('/')\n"
    source += f"other = {{n: os.listdir('/' + n) for n in root if n not in {sorted(SYSTEM)!r}}}\n"
    source += "print(json.dumps([os.getuid(), os.getcwd(), root, open('note').read(), other]))"
    result = run(source, mode)
    uid, cwd, root, note, other = json.loads(result.output)
    assert uid == result.uid >= 1 << 30
    assert cwd == sandbox.BOX and note == "kept"
    assert {"usr", "dev", "box"} <= set(root) and {"proc", "var"}.isdisjoint(root)
    interpreter = [Path(p).parts for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable))]
    for top, inside in other.items():
        assert set(inside) <= {parts[2] for parts in interpreter if parts[1] == top and len(parts) > 2}, top


def test_output_is_capped_head_and_tail(mode: str) -> None:
    result = run("print('A' * 100000); print('B' * 100000)", mode)
    assert result.status == "ok"
    assert result.output.startswith("A" * 2048) and result.output.endswith("B" * 2047 + "\n")
    assert "bytes of output dropped" in result.output and len(result.output) < 4200


@pytest.mark.parametrize("isolation", [sandbox.NAMESPACES, sandbox.RLIMITS])
def test_no_process_outlives_its_run(isolation: str) -> None:
    """A child left sleeping when the program ends is killed: by the PID namespace even after it
    left the session, or by killing the session in rlimits mode."""
    marker = f"{os.getpid()}.{len(isolation)}17"
    escape = "os.setsid(); " if isolation == sandbox.NAMESPACES else ""
    child = f"{escape}os.execv('/bin/sleep', ['sleep', '{marker}'])"
    source = f"import os\nif os.fork() == 0:\n    {child}\nprint('left')"
    result = run(source, isolation)
    assert result.output == "left\n"
    assert not [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_without_namespaces_the_probe_warns_and_falls_back() -> None:
    """In a user namespace that maps no uid, the kernel refuses to create namespaces: the probe
    says what is not isolated and the sandbox still runs code, with rlimits."""
    script = "import asyncio\nfrom levante.evals import sandbox\nprint(sandbox.probe())\n"
    script += "print(asyncio.run(sandbox.run('print(6 * 7)')).output)"
    done = subprocess.run(["unshare", "--user", sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == [sandbox.RLIMITS, "42"], done.stderr
    assert "unshare: Operation not permitted" in done.stderr and "NOT isolated" in done.stderr


def test_rlimits_mode_still_stops_loops_and_memory_bombs() -> None:
    """Without namespaces (logged as such by the probe), the time and memory limits still hold."""
    loop = run("while True:\n    pass", sandbox.RLIMITS, sandbox.Limits(wall=1, cpu=1))
    assert loop.status in ("killed", "timeout") and loop.uid is None
    bomb = run("print(len('x' * (1 << 36)))", sandbox.RLIMITS, LIMITS)
    assert bomb.status == "error" and "MemoryError" in bomb.output
