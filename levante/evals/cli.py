"""`levante eval SUITE…`: the model card's benchmarks against our server started in-process
(--model, the demo model by default) or any OpenAI-compatible endpoint (--endpoint)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from levante.cli import engine_config, model_flags, positive, server_config
from levante.errors import LevanteError
from levante.evals.suite import SUITES, Endpoint, Item, Suite

if TYPE_CHECKING:
    from levante.evals.runner import SuiteResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run benchmark suites and compare with the model card")
    p.set_defaults(func=cmd_eval)
    p.add_argument("suites", nargs="+", metavar="SUITE", choices=[*SUITES, "all"], help=", ".join(SUITES))
    model_flags(p)  # --model and its loading flags, for the in-process server
    p.add_argument("--endpoint", help="an OpenAI-compatible base URL instead of --model (…/v1)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="for --endpoint")
    p.add_argument("--served-model-name", help="the model name to request (default: the endpoint's first)")
    p.add_argument("--data-dir", type=Path, help="where the datasets' files are (see each suite's error)")
    p.add_argument("--sample", action="store_true", help="the bundled samples of a few items instead")
    p.add_argument("--limit", type=positive(int), help="only the first N items of each suite")
    p.add_argument(
        "--concurrency",
        type=positive(int),
        default=8,
        help="items in flight (an item may send several requests)",
    )
    p.add_argument("--out", type=Path, default=Path("levante-eval"), help="results, report and cache")
    p.add_argument("--samples", type=positive(int), default=5, help="samples per task for pass@k")
    p.add_argument("--temperature", type=float, help="override each suite's own")
    p.add_argument("--max-tokens", type=positive(int), help="override each suite's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-only", action="store_true", help="no /v1/completions logprobs: mmlu generative")
    p.add_argument("--anls-threshold", type=float, default=0.5, help="docvqa: 0.5 official, 0.0 Mistral's")
    p.add_argument("--gpqa-subset", default="diamond", choices=["diamond", "main", "extended"])
    p.add_argument("--judge-endpoint", help="an OpenAI-compatible base URL for the judge (simpleqa)")
    p.add_argument("--judge-model", help="default: the judge endpoint's first model")
    p.add_argument("--judge-api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=positive(float), default=3600.0, help="seconds per request")


def base_url(url: str) -> str:
    """A bare host URL gets OpenAI's /v1; one with a path is taken as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def first_model(url: str, api_key: str | None) -> str:
    import openai

    try:
        models = openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=2).models.list().data
    except openai.OpenAIError as e:
        raise LevanteError(f"{url}: cannot list models ({e}); pass the model name") from None
    if not models:
        raise LevanteError(f"{url}: serves no models")
    return models[0].id


def endpoint(url: str, api_key: str | None, model: str | None, timeout: float) -> Endpoint:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=3)
    return Endpoint(api, model or first_model(url, api_key))


@contextmanager
def local_server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """Our server on a free loopback port, in this process; yields its base URL and model name."""
    import uvicorn

    from levante.api.server import Server, create_app

    server = Server(server_config(args, engine_config(args), port=0))
    server.load()
    assert server.state is not None
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="levante-eval-server", daemon=True)
    thread.start()
    while not uv.started:
        if not thread.is_alive():
            raise LevanteError("the in-process server did not start")
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", server.state.model_name
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


def cmd_eval(args: argparse.Namespace) -> None:
    from levante.evals import report
    from levante.evals.suite import Options, suite_class

    if args.endpoint and args.model:
        raise LevanteError("give --endpoint or --model, not both")
    if not 0 <= args.anls_threshold < 1:
        raise LevanteError(f"--anls-threshold must be in [0, 1), got {args.anls_threshold}")
    judge = None
    if args.judge_endpoint:
        judge = endpoint(base_url(args.judge_endpoint), args.judge_api_key, args.judge_model, args.timeout)
    options = Options(
        samples=args.samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        judge=judge,
        chat_only=args.chat_only,
        anls_threshold=args.anls_threshold,
        gpqa_subset=args.gpqa_subset,
    )
    names = list(SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    suites = [suite_class(name)(options) for name in names]
    # every dataset is read before any model is loaded, so a missing file fails in a second
    work = [
        (s, s.load(args.data_dir, args.sample)[: args.limit] if not s.skip_reason() else []) for s in suites
    ]

    with target(args) as (url, model, label):
        api = endpoint(url, args.api_key, model, args.timeout)
        print(f"levante eval: {', '.join(names)} on {api.model} at {url}", file=sys.stderr)
        results = asyncio.run(evaluate(work, api, judge, args, f"{label} model={api.model}"))
    run = {
        "model": api.model,
        "endpoint": url if args.endpoint else f"in-process ({args.model or 'demo model'})",
        "sample": args.sample,
        "limit": args.limit,
        "options": {
            **dataclasses.asdict(dataclasses.replace(options, judge=None)),
            "judge": judge and judge.model,
        },
    }
    paths = report.write(args.out, results, run)
    print(paths["report"].read_text())
    for r in results:
        for item, error in r.failures.items():
            print(f"levante eval: {r.name} item {item} failed: {error}", file=sys.stderr)
    print(f"results: {paths['results']}  report: {paths['report']}  chart: {paths['chart']}", file=sys.stderr)


async def evaluate(
    work: list[tuple[Suite, list[Item]]],
    api: Endpoint,
    judge: Endpoint | None,
    args: argparse.Namespace,
    label: str,
) -> list[SuiteResult]:
    from levante.evals.runner import run_all

    try:
        cache = args.out / "cache.jsonl"
        return await run_all(work, api, cache, target=label, sample=args.sample, concurrency=args.concurrency)
    finally:
        for client in (api, judge):
            if client is not None:
                await client.api.close()


@contextmanager
def target(args: argparse.Namespace) -> Iterator[tuple[str, str | None, str]]:
    """(base URL, model name or None to ask the endpoint, what identifies the server in the cache)."""
    if args.endpoint:
        url = base_url(args.endpoint)
        yield url, args.served_model_name, url
        return
    where = Path(args.model).resolve() if args.model else "demo"
    with local_server(args) as (url, model):
        yield url, model, f"in-process {where} dtype={args.dtype} loop_guard={args.loop_guard}"
