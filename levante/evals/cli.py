"""`levante eval SUITE…`: the model card's benchmarks against our server started in-process
(--model, the demo model by default) or any OpenAI-compatible endpoint (--endpoint; given more
than once, the same items on each, then compared). `levante eval compare RUN…` compares runs."""

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
from levante.evals.suite import SUITES, Endpoint, Item, Options, Suite

if TYPE_CHECKING:
    from levante.evals.runner import SuiteResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="run benchmark suites and compare with the model card, or compare runs",
        usage="levante eval SUITE [SUITE …] [options]\n"
        "       levante eval compare RUN_A RUN_B [RUN …] [--out DIR]",
    )
    p.set_defaults(func=cmd_eval)
    p.add_argument(
        "suites",
        nargs="+",
        metavar="SUITE",
        help=f"{', '.join(SUITES)} or all; or `compare` followed by run folders (their --out)",
    )
    model_flags(p)  # --model and its loading flags, for the in-process server
    p.add_argument(
        "--endpoint",
        action="append",
        help="an OpenAI-compatible base URL instead of --model (…/v1); twice or more: the same items on "
        "each, then compared with the first",
    )
    p.add_argument(
        "--context-length",
        type=positive(int),
        help="the endpoint's context in tokens, where its /v1/models does not say (max_model_len)",
    )
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
    p.add_argument(
        "--out", type=Path, help="results, report and cache (default levante-eval; compare: levante-compare)"
    )
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


def describe(url: str, api_key: str | None, model: str | None) -> tuple[str, int | None]:
    """The model to ask (the given one, else the endpoint's first) and its context length where
    /v1/models says (`max_model_len`, as vLLM and our server report it)."""
    import openai

    try:
        models = openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=2).models.list().data
    except openai.OpenAIError as e:
        if model is not None:
            return model, None  # an endpoint without /v1/models: asked by name, context unknown
        raise LevanteError(f"{url}: cannot list models ({e}); pass the model name") from None
    if not models:
        raise LevanteError(f"{url}: serves no models")
    found = next((m for m in models if m.id == model), None) if model is not None else models[0]
    length = (found.model_extra or {}).get("max_model_len") if found is not None else None
    return model or models[0].id, length if isinstance(length, int) and length > 0 else None


def endpoint(
    url: str, api_key: str | None, model: str | None, timeout: float, context: int | None = None
) -> Endpoint:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=3)
    name, reported = describe(url, api_key, model)
    return Endpoint(api, name, context or reported)


def reopened(e: Endpoint) -> Endpoint:
    """The same endpoint through a new client (`copy()` would share the closed connection pool)."""
    from openai import AsyncOpenAI

    old = e.api
    api = AsyncOpenAI(
        base_url=old.base_url, api_key=old.api_key, timeout=old.timeout, max_retries=old.max_retries
    )
    return dataclasses.replace(e, api=api)


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
    from levante.evals import compare
    from levante.evals.suite import suite_class

    if args.suites[0] == "compare":
        out = args.out or Path("levante-compare")
        paths = compare.write(out, [compare.load(Path(run)) for run in args.suites[1:]])
        print(paths["report"].read_text())
        print(
            f"compared: {paths['results']}  report: {paths['report']}  chart: {paths['chart']}",
            file=sys.stderr,
        )
        return
    for name in args.suites:
        if name not in SUITES and name != "all":
            choices = ", ".join([*SUITES, "all"])
            raise LevanteError(
                f"unknown suite {name!r}; choose from {choices} (or: levante eval compare RUN…)"
            )
    endpoints: list[str | None] = list(args.endpoint or [None])
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
    out = args.out or Path("levante-eval")
    if len(endpoints) == 1:
        run_once(args, work, options, endpoints[0], out)
        return
    folders = [out / f"endpoint-{i}" for i in range(1, len(endpoints) + 1)]
    for url, folder in zip(endpoints, folders, strict=True):
        run_once(args, work, options, url, folder)
    paths = compare.write(out, [compare.load(folder) for folder in folders])
    print(paths["report"].read_text())
    print(
        f"compared: {paths['results']}  report: {paths['report']}  chart: {paths['chart']}", file=sys.stderr
    )


def run_once(
    args: argparse.Namespace,
    work: list[tuple[Suite, list[Item]]],
    options: Options,
    url: str | None,
    out: Path,
) -> None:
    """The suites' items against one endpoint (None: our server, in-process); the run's files in `out`."""
    from levante.evals import report

    # an asyncio client serves the one event loop it first ran in (and `evaluate` closes it): each
    # run asks the judge through a client of its own, and its suites carry that one
    judge = None if options.judge is None else reopened(options.judge)
    options = dataclasses.replace(options, judge=judge)
    work = [(type(suite)(options), items) for suite, items in work]
    with target(args, url) as (base, model, label):
        api = endpoint(base, args.api_key, model, args.timeout, args.context_length if url else None)
        print(f"levante eval: {', '.join(s.name for s, _ in work)} on {api.model} at {base}", file=sys.stderr)
        results = asyncio.run(evaluate(work, api, judge, args, out, f"{label} model={api.model}"))
    context = {
        "length": api.context,
        "source": "--context-length" if url and args.context_length else "the endpoint's /v1/models",
        "uncounted": api.uncountable[0] if api.uncountable else None,
    }
    run = {
        "model": api.model,
        "endpoint": base if url else f"in-process ({args.model or 'demo model'})",
        "target": label,  # what was served, as the cache keys it (in-process: dtype, quantization…)
        "sample": args.sample,
        "limit": args.limit,
        "context": context,
        "options": {
            **dataclasses.asdict(dataclasses.replace(options, judge=None)),
            "judge": judge and judge.model,
        },
    }
    paths = report.write(out, results, run)
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
    out: Path,
    label: str,
) -> list[SuiteResult]:
    from levante.evals.runner import run_all

    try:
        cache = out / "cache.jsonl"
        return await run_all(work, api, cache, target=label, sample=args.sample, concurrency=args.concurrency)
    finally:
        for client in (api, judge):
            if client is not None:
                await client.api.close()


@contextmanager
def target(args: argparse.Namespace, url: str | None) -> Iterator[tuple[str, str | None, str]]:
    """(base URL, model name or None to ask the endpoint, what identifies the server in the cache)."""
    if url is not None:
        base = base_url(url)
        yield base, args.served_model_name, base
        return
    where = Path(args.model).resolve() if args.model else "demo"
    with local_server(args) as (url, model):
        setup = f"dtype={args.dtype} quantization={args.quantization} kv_cache_dtype={args.kv_cache_dtype}"
        yield url, model, f"in-process {where} {setup} loop_guard={args.loop_guard}"
