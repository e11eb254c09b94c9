"""`levante batch` as users run it: a real process on the demo model over an OpenAI Batch API
file, killed with SIGKILL and rerun; its answers checked against the running server's own."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from servers import ServerProcess, post

from levante.batch.jobs import Job, record_key
from levante.cli import main
from levante.errors import LevanteError

FLAGS = ["--kv-cache-memory", "0.25", "--max-model-len", "2048"]  # the `demo` server's, so answers compare
NUM_LINES = 200


def request(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def good_line(i: int) -> str:
    if i % 2:
        body: dict[str, Any] = {"prompt": f"Item {i}: the", "max_tokens": 4, "temperature": 0}
        return request(f"r{i}", "/v1/completions", body)
    body = {
        "messages": [{"role": "user", "content": f"Name a fruit and a number near {i}."}],
        "max_tokens": 4,
    }
    body |= {"temperature": 0, "seed": i}
    if i % 10 == 0:
        body["response_format"] = {"type": "json_object"}
    return request(f"r{i}", "/v1/chat/completions", body)


# 1-based line -> the line, the key its output line has (a custom_id, or the line number when the
# line has none), and what that output line must say
BAD: dict[int, tuple[str, str | int, dict[str, Any]]] = {
    3: ('{"custom_id": "cut", "method": "POST", "url": "/v1/comp', 3, {"code": "invalid_json_line"}),
    60: (request("emb", "/v1/embeddings", {"input": "x"}), "emb", {"code": "invalid_url", "param": "url"}),
    101: (
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
        "get",
        {"code": "invalid_request", "param": "method"},
    ),
    150: (
        request("nomsg", "/v1/chat/completions", {"max_tokens": 4}),
        "nomsg",
        {"status": 400, "param": "messages"},
    ),
    200: (
        request("hot", "/v1/completions", {"prompt": "x", "temperature": -1}),
        "hot",
        {"status": 400, "param": "temperature"},
    ),
}


def job_lines() -> list[str]:
    return [BAD[n][0] if n in BAD else good_line(n) for n in range(1, NUM_LINES + 1)]


def write_job(path: Path) -> Path:
    path.write_text("\n".join(job_lines()) + "\n")
    return path


def command(input_path: Path, output_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "levante.cli", "batch", str(input_path), str(output_path), *FLAGS, *extra]


def essence(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """What must agree between two answers to one request: everything but ids, times and the
    prefix-cache hits (which depend on what ran before)."""
    if status != 200:
        return {"status": status, **body}
    usage = {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"status": status, "model": body["model"], "choices": body["choices"], "usage": usage}


@functools.cache
def server_answers(url: str) -> dict[str, dict[str, Any]]:
    """The running server's answer to every request in the job (those that reach it), by custom_id."""
    lines = [line for n, line in enumerate(job_lines(), 1) if n not in BAD or "status" in BAD[n][2]]
    requests = [json.loads(line) for line in lines]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: post(url, r["url"], r["body"]), requests))
    return {r["custom_id"]: essence(*answer) for r, answer in zip(requests, answers, strict=True)}


def check_output(path: Path, answers: dict[str, dict[str, Any]]) -> None:
    """Exactly one output line per input line: the server's answer for each request, and an error
    naming the line for each line that is not a request."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_key = {record_key(r): r for r in records}
    assert len(by_key) == len(records) == NUM_LINES
    assert set(by_key) == {BAD[n][1] if n in BAD else f"r{n}" for n in range(1, NUM_LINES + 1)}
    assert len({r["id"] for r in records}) == NUM_LINES
    ok = [r for r in records if r["response"] is not None and r["response"]["status_code"] == 200]
    assert len(ok) == NUM_LINES - len(BAD)
    for n, (_, key, want) in BAD.items():
        rec = by_key[key]
        if "status" in want:
            assert rec["error"] is None and rec["response"]["status_code"] == want["status"]
            assert rec["response"]["body"]["error"]["param"] == want["param"]
        else:
            assert rec["response"] is None and rec["error"]["line"] == n
            assert rec["error"]["message"].startswith(f"line {n}: ")
            assert {k: rec["error"][k] for k in want} == want
    for key, rec in by_key.items():
        if rec["response"] is not None:
            assert essence(rec["response"]["status_code"], rec["response"]["body"]) == answers[key], key


def run_until_killed(cmd: list[str], output: Path, lines: int, log: Path) -> None:
    """Starts the job and kills it with SIGKILL once the output holds `lines` lines."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not output.exists() or output.read_bytes().count(b"\n") < lines:
        assert proc.poll() is None, f"the job ended before the kill:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    proc.kill()
    assert proc.wait() == -9


def test_killed_twice_then_rerun_gives_one_line_per_request_with_the_servers_answers(
    tmp_path: Path, demo: ServerProcess
) -> None:
    job, output, log = write_job(tmp_path / "in.jsonl"), tmp_path / "out.jsonl", tmp_path / "batch.log"
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    written = 0
    for _ in range(2):  # each kill once at least a few more lines are out, at a random count
        run_until_killed(command(job, output), output, written + rng.randint(4, 40), log)
        written = output.read_bytes().count(b"\n")
    with output.open("ab") as f:  # as if the last kill had landed in the middle of a write
        f.write(b'{"id": "batch_req_0", "custom_id": "r1", "resp')
    done = subprocess.run(command(job, output), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"; {written} done before)" in done.stderr, f"seed {seed}: {done.stderr[-500:]}"
    try:
        check_output(output, server_answers(demo.url))
    except AssertionError:  # what the processes said (a kernel fallback, say) is what explains it
        print(f"seed {seed}; killed runs:\n{log.read_text()[-3000:]}\nlast run:\n{done.stderr[-3000:]}")
        raise


def test_duplicate_custom_ids_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = job_lines()[:10]
    lines[6] = lines[1]  # r2 again
    lines[8] = lines[1]
    job = tmp_path / "in.jsonl"
    job.write_text("\n".join(lines) + "\n")
    assert main(["batch", str(job), str(tmp_path / "out.jsonl")]) == 1
    assert "duplicate custom_id: 'r2' on lines 2, 7, 9" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_reopened_output_loses_its_half_line_and_refuses_a_second_writer_or_another_jobs_file(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path / "in.jsonl")
    output = tmp_path / "out.jsonl"
    whole = [json.dumps({"id": f"b{i}", "custom_id": f"r{i}", "response": {}, "error": None}) for i in (1, 2)]
    output.write_text("\n".join(whole) + '\n{"id": "b4", "custom_id": "r4", "respo')
    resumed = Job(job, output)
    with pytest.raises(LevanteError, match="another levante batch is writing to this file"):
        Job(job, output)
    resumed.close()
    assert output.read_text() == "\n".join(whole) + "\n"
    assert [line.key for line in resumed.pending][:3] == [3, "r4", "r5"]
    assert len(resumed.pending) == NUM_LINES - 2

    output.write_text(
        json.dumps({"id": "b9", "custom_id": "elsewhere", "response": {}, "error": None}) + "\n"
    )
    with pytest.raises(LevanteError, match=r"'elsewhere', which .* does not have"):
        Job(job, output)
