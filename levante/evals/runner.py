"""Runs suites against an endpoint: items concurrently (asyncio), each finished record appended to
a cache file at once so a killed run loses nothing finished, a progress bar with items/s and ETA,
and an item that raises reported with its error instead of stopping the run."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from levante.evals.suite import Endpoint, Item, Options, Record, Suite


@dataclass
class SuiteResult:
    name: str
    settings: dict[str, Any]
    card: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # item id -> the error
    cached: int = 0  # records taken from the cache instead of run
    skipped: str | None = None
    not_applicable: str | None = None  # the endpoint refused what the suite needs: its refusal
    fitted: int = 0  # requests whose max_tokens was cut to the endpoint's context


class Cache:
    """Finished records, one JSON line each, keyed by everything that decides the result. Lines are
    only ever appended (and flushed to disk) so a kill at any moment leaves every finished item;
    a line cut short by the kill is dropped when the file is opened again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        if path.exists():
            data = path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                with path.open("r+b") as f:
                    f.truncate(len(whole))
            for line in whole.decode().splitlines():
                entry = json.loads(line)
                self.records[entry["key"]] = Record(**entry["record"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def get(self, key: str) -> Record | None:
        return self.records.get(key)

    def put(self, key: str, suite: str, record: Record) -> None:
        entry = {"key": key, "suite": suite, "record": dataclasses.asdict(record)}
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.records[key] = record

    def close(self) -> None:
        self.file.close()


def options_key(options: Options) -> dict[str, Any]:
    """The run-wide options as JSON, the judge by its model and URL."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    judge = options.judge
    out["judge"] = [judge.model, str(judge.api.base_url)] if judge else None
    return out


def item_key(suite: Suite, item: Item, target: str, sample: bool) -> str:
    """What decides an item's record: the suite and its settings, the item, the model under test
    (`target`: the endpoint URL and model name, or the model path run in-process) and the options."""
    parts = {
        "suite": suite.name,
        "item": item.id,
        "sample": sample,
        "settings": suite.settings(),
        "target": target,
        "options": options_key(suite.options),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


async def run_suite(
    suite: Suite,
    items: list[Item],
    endpoint: Endpoint,
    cache: Cache,
    *,
    target: str,
    sample: bool,
    concurrency: int,
) -> SuiteResult:
    result = SuiteResult(suite.name, suite.settings(), dict(suite.card))
    reason = suite.skip_reason()
    if reason is not None:
        result.skipped = reason
        return result
    endpoint = endpoint.view()
    for capability in suite.needs():
        try:
            refusal = await endpoint.refuses(capability)
        except Exception:  # the endpoint is down or broken: the items fail and say why
            refusal = None
        if refusal is not None:
            result.not_applicable = f"the endpoint refuses {capability}: {refusal}"
            return result
    keys = {item.id: item_key(suite, item, target, sample) for item in items}
    done = {item.id: r for item in items if (r := cache.get(keys[item.id])) is not None}
    result.cached = len(done)
    semaphore = asyncio.Semaphore(concurrency)
    with tqdm(total=len(items), initial=len(done), desc=suite.name, unit="item", dynamic_ncols=True) as bar:

        async def one(item: Item) -> None:
            async with semaphore:
                try:
                    record = await suite.run(item, endpoint)
                except Exception as e:  # the item could not run at all: report it, go on
                    result.failures[item.id] = f"{type(e).__name__}: {e}"
                else:
                    cache.put(keys[item.id], suite.name, record)
                    done[item.id] = record
            bar.update()

        await asyncio.gather(*(one(item) for item in items if item.id not in done))
    result.fitted = endpoint.fitted
    result.records = [done[item.id] for item in items if item.id in done]
    result.metrics = suite.summarize(result.records) if result.records else {}
    return result


async def run_all(
    work: list[tuple[Suite, list[Item]]],
    endpoint: Endpoint,
    cache_path: Path,
    *,
    target: str,
    sample: bool,
    concurrency: int,
) -> list[SuiteResult]:
    """Each suite in turn (its items concurrently), against one cache file."""
    cache = Cache(cache_path)
    try:
        return [
            await run_suite(
                suite, items, endpoint, cache, target=target, sample=sample, concurrency=concurrency
            )
            for suite, items in work
        ]
    finally:
        cache.close()
