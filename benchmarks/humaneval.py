"""HumanEval in full: `levante eval humaneval` over all 164 problems (no --limit) against the demo
model behind a real `levante serve`, with concurrent requests; every sample runs in the sandbox.

Prints the scores and the eval's wall time (the server's start-up is not counted), plus the
machine's load average, since generation and the sandboxed tests share its CPUs with anything
else running.

    python benchmarks/humaneval.py --concurrency 16 --samples 5
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
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--samples", type=int, default=5, help="samples per problem (pass@k for k <= n)")
    parser.add_argument("--max-tokens", type=int, help="default: the suite's own (768, as EvalPlus)")
    parser.add_argument("--kv-cache-memory", default="1", help="GiB for the server's KV cache")
    parser.add_argument("--threads", type=int, help="the server's torch threads (1 on a busy shared machine)")
    parser.add_argument("--out", type=Path, help="results directory (default: a temporary one)")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="levante-humaneval-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out / "server.log"
    serve = [sys.executable, "-m", "levante.cli", "serve", "--port", str(port), "--max-model-len", "2048"]
    serve += ["--kv-cache-memory", args.kv_cache_memory]
    serve += ["--max-num-seqs", str(args.concurrency * args.samples)]  # every sample in one batch
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with log.open("wb") as f:
        server = subprocess.Popen(serve, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, server, log)
        command = [sys.executable, "-m", "levante.cli", "eval", "humaneval", "--endpoint", url]
        command += ["--out", str(out)]
        command += ["--concurrency", str(args.concurrency), "--samples", str(args.samples)]
        command += ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
        start, load = time.perf_counter(), os.getloadavg()[0]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    finally:  # SIGTERM drains running requests; an interrupted run should not wait for them
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    suite = json.loads((out / "results.json").read_text())["suites"]["humaneval"]
    records = suite["records"]
    verdicts = [s["base"] for r in records for s in r["info"]["samples"]]
    scores = "  ".join(f"{name} {value:.2f}" for name, value in suite["metrics"].items())
    print(f"humaneval: {len(records)} problems x {args.samples} samples, concurrency {args.concurrency}")
    print(f"  settings {json.dumps(suite['settings'])}; server threads {args.threads or 'default'}")
    print(f"  {scores}")
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in ("pass", "fail", "timeout"))
    print(f"  samples: {counts}")
    print(f"  wall {wall:.0f} s, {len(verdicts) / wall:.2f} samples/s")
    print(
        f"  load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPUs)"
    )
    print(f"  results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
