"""Batch throughput on the demo model: `levante batch` in one process vs `--ray --replicas N`.

One run, one job for both: --requests distinct chat requests, greedy, `ignore_eos` so request i
generates exactly its own max_tokens (spread around --tokens, so results do not all land at
once). Both modes run as a user runs them: a fresh process each (Ray on a local head this script
starts with the machine's CPUs and stops at the end), timed from process start to exit, model
loads included (the replicas load theirs in parallel), and to the first result written. The two
outputs must hold the same answers. With fewer cores than the replicas could use, the ratio is
the overhead of splitting the job; with more, it is the scaling.

    .venv/bin/python benchmarks/batch.py --requests 1024 --tokens 32 --replicas 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LEVANTE = [sys.executable, "-m", "levante.cli", "batch"]


def max_tokens(i: int, tokens: int) -> int:
    return tokens // 2 + (i * 7) % tokens


def write_job(path: Path, requests: int, tokens: int) -> None:
    with path.open("w") as f:
        for i in range(requests):
            body = {
                "messages": [{"role": "user", "content": f"Write a short note about the number {i}."}],
                "max_tokens": max_tokens(i, tokens),
                "temperature": 0,
                "ignore_eos": True,
            }
            line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")


def run(args: list[str], output: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds from process start to exit, and to the first result in the output file."""
    log = output.with_suffix(".log")
    start = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(LEVANTE + args, stdout=subprocess.DEVNULL, stderr=err, env=env)
    first = None
    while proc.poll() is None:
        if first is None and output.exists() and output.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.02)
    if proc.returncode or first is None:
        raise SystemExit(f"levante batch failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start, first


def ray_head(temp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A local Ray head in the foreground of a child process (so stopping it stops only it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).parent / "ray"
    command = [str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    status = [str(ray), "status", f"--address={address}"]
    while subprocess.run(status, capture_output=True).returncode:
        if proc.poll() is not None:
            raise SystemExit("the Ray head did not start")
        time.sleep(1)
    return proc, address


def answers(path: Path) -> dict[str, list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["custom_id"]: r["response"]["body"]["choices"] for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32, help="mean generated tokens per request")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="1", help="GiB per engine")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="levante-batch-bench") as tmp:
        work = Path(tmp)
        job = work / "job.jsonl"
        write_job(job, args.requests, args.tokens)
        flags = ["--kv-cache-memory", args.kv_cache_memory]
        single = run([str(job), str(work / "single.jsonl"), *flags], work / "single.jsonl")
        with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_temp:  # Ray wants short paths
            head, address = ray_head(Path(ray_temp))
            try:
                env = {**os.environ, "RAY_ADDRESS": address}
                ray_args = ["--ray", "--replicas", f"{args.replicas}"]
                on_ray = run([str(job), str(work / "ray.jsonl"), *flags, *ray_args], work / "ray.jsonl", env)
            finally:
                head.terminate()
                head.wait(timeout=60)
        same = answers(work / "single.jsonl") == answers(work / "ray.jsonl")

    tokens = sum(max_tokens(i, args.tokens) for i in range(args.requests))
    print(
        f"demo model, {args.requests} requests, {tokens} generated tokens, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; same answers: {same}"
    )
    print(f"{'mode':<16}{'wall s':>8}{'first result s':>16}{'req/s':>8}{'tok/s':>8}")
    for name, (wall, first) in {"single process": single, f"ray x{args.replicas}": on_ray}.items():
        print(f"{name:<16}{wall:>8.1f}{first:>16.1f}{args.requests / wall:>8.2f}{tokens / wall:>8.1f}")
    print(f"ray/single throughput: {single[0] / on_ray[0]:.2f}x")
    if not same:
        raise SystemExit("the two outputs differ")


if __name__ == "__main__":
    main()
