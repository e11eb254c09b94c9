"""Online serving load: Levante's OpenAI-compatible server against llama.cpp's llama-server on the
same GGUF (the demo model by default), one after the other in one run, like vLLM's
benchmark_serving.py. Every server gets the same fixed-seed prompts (random words of the model's
own vocabulary, cut to exactly --input-len tokens by its tokenizer) as streamed /v1/completions
with greedy sampling, `ignore_eos` and a fixed `max_tokens`, so each emits the same number of
tokens. Per server: a single-stream run (concurrency 1) for decode tok/s, then --requests requests
at --concurrency in flight (or Poisson arrivals at --request-rate, still capped by --concurrency):
TTFT, TPOT, ITL and end-to-end latency (mean, p50/p90/p99), request and output token throughput.
Output tokens come from the server's usage when it reports one, else one per streamed text chunk.

    bash benchmarks/build_llama_server.sh   # once; prints the binary's path
    .venv/bin/python benchmarks/serving.py --levante --llama-server ~/.cache/levante-bench/llama-server

--levante starts `.venv/bin/levante serve --model <gguf> --port <port>` (--levante-cmd, --levante-args
change it, e.g. --levante-args "--dtype bfloat16"); --llama-server starts that binary with one slot
per concurrent request and 2 threads; each server is stopped before the next starts. --url URL
(labelled --name) benchmarks a server that is already running, alone or after those.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openai import AsyncOpenAI

LEVANTE_CMD = f"{Path(sys.executable).with_name('levante')} serve --model {{model}} --port {{port}}"
PERCENTILES = (50, 90, 99)


@dataclass
class Request:
    """One streamed completion, timed on the client from just before it was sent."""

    ttft: float
    e2e: float
    itl: list[float]  # gaps between consecutive chunks that carried text
    output_tokens: int
    prompt_tokens: int | None  # from usage; None when the server reported none
    from_usage: bool


@dataclass
class Run:
    requests: list[Request]
    duration: float
    client_cpu: float  # seconds this process ran: the client shares the CPUs with the server

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time after the first token, summed over requests."""
        return sum(r.output_tokens - 1 for r in self.requests) / sum(r.e2e - r.ttft for r in self.requests)

    def tpot(self) -> list[float]:
        return [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in self.requests if r.output_tokens > 1]


def make_prompts(model: Path, count: int, length: int, seed: int) -> list[str]:
    """Distinct random word sequences of exactly `length` tokens (the model's tokenizer, no BOS):
    identical inputs for every server, with no shared prefix a prompt cache could reuse."""
    from levante.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    words = [w for i in range(tok.vocab_size) if re.fullmatch(r" [a-z]{3,}", w := tok.decode([i]))]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        # Each word is at least one token, so `length` words encode to at least `length` tokens.
        ids = tok.encode("".join(rng.choice(words, length)).lstrip(), add_bos=False)
        prompts.append(tok.decode(ids[:length]))
    return prompts


async def complete(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Request:
    start = time.perf_counter()
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    arrivals: list[float] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        usage = chunk.usage or usage
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError(f"the server streamed no text for a request (usage: {usage})")
    return Request(
        ttft=arrivals[0] - start,
        e2e=end - start,
        itl=np.diff(arrivals).tolist(),
        output_tokens=usage.completion_tokens if usage else len(arrivals),
        prompt_tokens=usage.prompt_tokens if usage else None,
        from_usage=usage is not None,
    )


async def run_load(
    client: AsyncOpenAI,
    model: str,
    prompts: list[str],
    max_tokens: int,
    concurrency: int,
    rate: float,
    seed: int,
) -> Run:
    """All prompts, at most `concurrency` in flight; arrivals are a Poisson process when `rate` is
    finite, else all at once."""
    slots = asyncio.Semaphore(concurrency)
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts)) if math.isfinite(rate) else None

    async def limited(prompt: str) -> Request:
        async with slots:
            return await complete(client, model, prompt, max_tokens)

    start, cpu = time.perf_counter(), time.process_time()
    tasks = []
    for i, prompt in enumerate(prompts):
        if gaps is not None and i:
            await asyncio.sleep(gaps[i])
        tasks.append(asyncio.create_task(limited(prompt)))
    requests = await asyncio.gather(*tasks)
    return Run(list(requests), time.perf_counter() - start, time.process_time() - cpu)


@dataclass
class Result:
    name: str
    single: Run
    load: Run


async def benchmark(name: str, base_url: str, prompts: list[str], args: argparse.Namespace) -> Result:
    """One warm-up request, --single-stream-requests one at a time, then the load; each phase gets
    prompts of its own so no prompt is seen twice."""
    # A fresh connection per request: llama-server closes a kept-alive connection after a streamed
    # response without saying so, and the next request on it fails ("Server disconnected").
    client = AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key="none",
        max_retries=0,
        timeout=600,
        default_headers={"Connection": "close"},
    )
    async with client:
        model = (await client.models.list()).data[0].id
        k = args.single_stream_requests
        await complete(client, model, prompts[0], max_tokens=8)
        single = await run_load(client, model, prompts[1 : 1 + k], args.max_tokens, 1, math.inf, args.seed)
        load = await run_load(
            client, model, prompts[1 + k :], args.max_tokens, args.concurrency, args.request_rate, args.seed
        )
    return Result(name, single, load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(cmd: list[str], base_url: str, log: Path, timeout: float) -> Iterator[None]:
    """Starts the server in its own process group, waits until /health answers 200, and stops the
    whole group afterwards (servers may fork workers)."""
    print(f"$ {shlex.join(cmd)}  (log: {log})", flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s; see {log}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stats(values: list[float]) -> list[float]:
    return [float(np.mean(values)), *(float(np.percentile(values, p)) for p in PERCENTILES)]


def report(result: Result, args: argparse.Namespace) -> None:
    load = result.load
    requests = load.requests
    prompt_tokens = [r.prompt_tokens for r in requests if r.prompt_tokens is not None]
    short = [r.output_tokens for r in requests if r.output_tokens != args.max_tokens]
    print(f"\n== {result.name} ==")
    print(
        f"single stream: decode {result.single.decode_tok_s:.1f} tok/s, "
        f"TTFT {np.mean([r.ttft for r in result.single.requests]) * 1e3:.0f} ms "
        f"({len(result.single.requests)} requests)"
    )
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(
        f"load: {len(requests)} requests, concurrency {args.concurrency}, arrivals {rate}, "
        f"{load.duration:.2f} s (client CPU {load.client_cpu:.2f} s); {load.output_tokens} output tokens "
        f"({'from usage' if all(r.from_usage for r in requests) else 'counted by chunks where no usage'})"
        + (f", prompt tokens {min(prompt_tokens)}-{max(prompt_tokens)}" if prompt_tokens else "")
    )
    if short:
        print(f"WARNING: {len(short)} requests got fewer than {args.max_tokens} tokens: ignore_eos ignored?")
    print(f"request throughput {len(requests) / load.duration:.2f} req/s")
    print(f"output token throughput {load.output_tokens / load.duration:.1f} tok/s")
    print(f"{'ms':<6}{'mean':>9}" + "".join(f"{'p' + str(p):>9}" for p in PERCENTILES))
    rows = {
        "TTFT": [r.ttft for r in requests],
        "TPOT": load.tpot(),
        "ITL": [g for r in requests for g in r.itl],
        "E2E": [r.e2e for r in requests],
    }
    for label, values in rows.items():
        print(f"{label:<6}" + "".join(f"{v * 1e3:>9.1f}" for v in _stats(values)))


def compare(results: list[Result]) -> None:
    """Side by side, with Levante / llama-server when both ran."""
    names = [r.name for r in results]
    ratio = "levante" in names and "llama-server" in names
    rows = {
        "single-stream decode tok/s": [r.single.decode_tok_s for r in results],
        "aggregate output tok/s": [r.load.output_tokens / r.load.duration for r in results],
        "request throughput req/s": [len(r.load.requests) / r.load.duration for r in results],
        "TTFT p50 ms": [np.percentile([q.ttft for q in r.load.requests], 50) * 1e3 for r in results],
        "TPOT p50 ms": [np.percentile(r.load.tpot(), 50) * 1e3 for r in results],
        "E2E p50 ms": [np.percentile([q.e2e for q in r.load.requests], 50) * 1e3 for r in results],
    }
    print("\n== comparison ==")
    header = f"{'':<28}" + "".join(f"{n:>14}" for n in names)
    print(header + (f"{'levante/llama-server':>22}" if ratio else ""))
    for label, values in rows.items():
        line = f"{label:<28}" + "".join(f"{v:>14.1f}" for v in values)
        if ratio:
            line += f"{values[names.index('levante')] / values[names.index('llama-server')]:>21.2f}x"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levante", action="store_true", help="start Levante's server and benchmark it")
    ap.add_argument("--levante-cmd", default=LEVANTE_CMD, help="{model}, {port} filled in; %(default)s")
    ap.add_argument("--levante-args", default="", help="appended to --levante-cmd, e.g. '--dtype bfloat16'")
    ap.add_argument("--llama-server", type=Path, metavar="PATH", help="start this llama-server, benchmark it")
    ap.add_argument("--llama-server-args", default="", help="appended to llama-server's command line")
    ap.add_argument("--url", help="benchmark a server already running here, e.g. http://127.0.0.1:8000")
    ap.add_argument("--name", default="server", help="label for --url's results")
    ap.add_argument("--model", type=Path, help="GGUF to serve and tokenize with (default: demo)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s")
    ap.add_argument("--input-len", type=int, default=100, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--single-stream-requests", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    ap.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.levante or args.llama_server or args.url):
        ap.error("nothing to benchmark: give --levante, --llama-server PATH and/or --url URL")
    if args.model is None:
        from levante.loader import demo_model_path

        args.model = demo_model_path()

    count = 1 + args.single_stream_requests + args.requests
    prompts = make_prompts(args.model, count, args.input_len, args.seed)
    # Enough context for every slot to hold its prompt, a BOS and its output, with some slack.
    ctx = args.concurrency * (args.input_len + args.max_tokens + 16)
    targets: list[tuple[str, list[str] | None, str]] = []
    if args.levante:
        port = free_port()
        cmd = shlex.split(args.levante_cmd.format(model=args.model, port=port))
        targets.append(("levante", cmd + shlex.split(args.levante_args), f"http://127.0.0.1:{port}"))
    if args.llama_server:
        port = free_port()
        cmd = [str(args.llama_server), "-m", str(args.model), "-np", str(args.concurrency), "-c", str(ctx)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads)]
        cmd += shlex.split(args.llama_server_args)
        targets.append(("llama-server", cmd, f"http://127.0.0.1:{port}"))
    if args.url:
        targets.append((args.name, None, args.url.rstrip("/")))

    results = []
    for name, cmd, url in targets:
        if cmd is None:
            results.append(asyncio.run(benchmark(name, url, prompts, args)))
        else:
            log = Path(tempfile.gettempdir()) / f"levante-bench-{name}.log"
            with serving(cmd, url, log, args.startup_timeout):
                results.append(asyncio.run(benchmark(name, url, prompts, args)))
        report(results[-1], args)
    if len(results) > 1:
        compare(results)


if __name__ == "__main__":
    main()
