"""Batch jobs in OpenAI's Batch API file format, run by the same FastAPI app `levante serve` runs.

Each input line goes to the app in-process through ASGI, so its response body is exactly what
the server answers for that request (validation, 400s naming the field, tools, usage); many lines
are in flight at once, so the engine batches them continuously. The output is resumable: every
line is appended whole and fsynced as its request finishes, a rerun skips the lines already
written, and a line cut short by a crash is truncated away first."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from levante.errors import LevanteError

if TYPE_CHECKING:
    from levante.api.server import ServerConfig

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class BatchLine:
    """One input line: a request for the app, or the reason it cannot be one."""

    number: int  # 1-based line in the input file
    custom_id: str | None
    url: str = ""
    body: str = ""  # the JSON request body as the app receives it
    error: dict[str, Any] | None = None

    @property
    def key(self) -> str | int:
        """What identifies the line across runs: its custom_id, or its number when it has none."""
        return self.custom_id if self.custom_id is not None else self.number


def parse_line(number: int, text: str) -> BatchLine:
    """Checks the envelope (custom_id, method, url, body); the body itself is the app's to judge."""

    def bad(code: str, message: str, param: str | None, custom_id: str | None = None) -> BatchLine:
        error = {"code": code, "message": f"line {number}: {message}", "param": param, "line": number}
        return BatchLine(number, custom_id, error=error)

    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        return bad("invalid_json_line", f"not valid JSON ({e})", None)
    if not isinstance(entry, dict):
        return bad("invalid_json_line", "not a JSON object", None)
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("invalid_request", "custom_id must be a non-empty string", "custom_id")
    if entry.get("method") != "POST":
        method = entry.get("method")
        return bad("invalid_request", f"method must be POST, got {method!r}", "method", custom_id)
    if entry.get("url") not in URLS:
        urls = " or ".join(URLS)
        return bad("invalid_url", f"url must be {urls}, got {entry.get('url')!r}", "url", custom_id)
    body = entry.get("body")
    if not isinstance(body, dict):
        return bad("invalid_request", "body must be a JSON object", "body", custom_id)
    if body.get("stream"):
        return bad("invalid_request", "stream is not supported in a batch", "body.stream", custom_id)
    return BatchLine(number, custom_id, entry["url"], json.dumps(body, ensure_ascii=False))


def read_input(path: Path) -> list[BatchLine]:
    """Every non-blank line of the input; duplicate custom_ids are refused before anything runs,
    since the output could not tell their results apart."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LevanteError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LevanteError(f"{path}: not readable as UTF-8 text ({e})") from None
    lines = [parse_line(i, t) for i, t in enumerate(text.splitlines(), 1) if t.strip()]
    seen: dict[str, list[int]] = {}
    for line in lines:
        if line.custom_id is not None:
            seen.setdefault(line.custom_id, []).append(line.number)
    dups = [(cid, nums) for cid, nums in seen.items() if len(nums) > 1]
    if dups:
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, nums))}" for cid, nums in dups[:5])
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise LevanteError(f"{path}: duplicate custom_id: {shown}{more}")
    return lines


def record(
    line: BatchLine,
    status: int | None = None,
    body: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An output line in OpenAI's format: `response` when the app answered (any status), else `error`."""
    response = None
    if status is not None:
        request_id = (body or {}).get("id") or f"req_{uuid.uuid4().hex}"  # the id in the request log
        response = {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": response,
        "error": error,
    }


def record_key(rec: dict[str, Any]) -> str | int:
    custom_id = rec.get("custom_id")
    return custom_id if isinstance(custom_id, str) else rec["error"]["line"]


class ResultFile:
    """The output JSONL, appended one whole line at a time and fsynced, so a crash loses at most
    the line being written, which `repair` truncates. Locked while open: two jobs appending to one
    file would run its requests twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a+b")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise LevanteError(f"{path}: another levante batch is writing to this file") from None
        self.file.seek(0)
        data = self.file.read()
        self.end = data.rfind(b"\n") + 1  # where the whole lines end
        self.done: set[str | int] = set()
        for i, raw in enumerate(data[: self.end].splitlines(), 1):
            try:
                self.done.add(record_key(json.loads(raw)))
            except (ValueError, KeyError, TypeError, AttributeError):
                self.file.close()
                raise LevanteError(f"{path}:{i}: not a batch output line; is it this job's output?") from None

    def repair(self) -> None:
        if self.file.seek(0, os.SEEK_END) > self.end:
            self.file.truncate(self.end)
            os.fsync(self.file.fileno())

    def append(self, rec: dict[str, Any]) -> None:
        self.file.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class Job:
    """An input file against its output file: what is left to run, and where each result goes."""

    def __init__(self, input_path: Path, output_path: Path) -> None:
        lines = read_input(input_path)
        if input_path.resolve() == output_path.resolve():
            raise LevanteError(f"{output_path}: the output file must differ from the input file")
        self.output = ResultFile(output_path)
        keys = {line.key for line in lines}
        stray = [k for k in self.output.done if k not in keys]
        if stray:
            self.output.close()
            raise LevanteError(
                f"{output_path}: has results for custom_id {stray[0]!r}, which {input_path} does not have; "
                "is it another job's output?"
            )
        self.output.repair()
        self.pending = [line for line in lines if line.key not in self.output.done]
        self.skipped = len(lines) - len(self.pending)
        self.ok = self.failed = self.tokens = 0
        self.start = time.monotonic()
        self.bar: tqdm | None = None

    def begin(self) -> None:
        """Starts the clock and the progress bar once the model has loaded, so that loading does
        not count against the rates."""
        self.start = time.monotonic()
        total = self.skipped + len(self.pending)
        self.bar = tqdm(total=total, initial=self.skipped, unit="req", file=sys.stderr, disable=None)

    def write(self, rec: dict[str, Any]) -> None:
        self.output.append(rec)
        response = rec["response"]
        if response is not None and response["status_code"] == 200:
            self.ok += 1
            self.tokens += (response["body"].get("usage") or {}).get("completion_tokens", 0)
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / self.elapsed:.0f} tok/s", refresh=False)
            self.bar.update()

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def close(self) -> str:
        """Closes the output; the summary line for the user."""
        if self.bar is not None:
            self.bar.close()
        self.output.close()
        done = self.ok + self.failed
        return (
            f"{done} requests ({self.ok} ok, {self.failed} failed; {self.skipped} done before) in "
            f"{self.elapsed:.1f} s: {done / self.elapsed:.2f} req/s, {self.tokens / self.elapsed:.1f} "
            f"generated tok/s -> {self.output.path}"
        )


async def asgi_post(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through an ASGI app, without a socket: its status and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0),
        "server": ("levante-batch", 0),
    }
    finished = asyncio.Event()
    delivered = False
    status: int | None = None
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client never goes away before its answer
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:
        if status is None:  # Starlette re-raises a bug after sending its 500; only an unsent one is ours
            raise
    finally:
        finished.set()
    assert status is not None
    return status, b"".join(chunks)


class Dispatcher:
    """`levante serve`'s app and engine, in-process."""

    def __init__(self, config: ServerConfig) -> None:
        from levante.api.server import Server, create_app

        self.server = Server(config)
        self.server.load()
        self.app = create_app(self.server)

    @property
    def max_num_seqs(self) -> int:
        return self.server.config.engine.max_num_seqs

    async def run(self, line: BatchLine) -> dict[str, Any]:
        if line.error is not None:
            return record(line, error=line.error)
        status, raw = await asgi_post(self.app, line.url, line.body.encode())
        return record(line, status, json.loads(raw))

    def close(self) -> None:
        if self.server.state is not None:
            self.server.state.engine.close()


async def run_unordered(dispatcher: Dispatcher, lines: Iterable[BatchLine], job: Job) -> None:
    """Keeps twice the engine's batch in flight (a full batch plus a queue behind it) and writes
    each result as it finishes."""
    window = 2 * dispatcher.max_num_seqs
    todo = iter(lines)
    running: set[asyncio.Task[dict[str, Any]]] = set()
    while True:
        while len(running) < window and (line := next(todo, None)) is not None:
            running.add(asyncio.ensure_future(dispatcher.run(line)))
        if not running:
            return
        finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            job.write(task.result())


def run_local(job: Job, config: ServerConfig) -> None:
    """The whole job on one engine in this process."""
    dispatcher = Dispatcher(config)
    job.begin()

    async def main() -> None:
        try:
            await run_unordered(dispatcher, job.pending, job)
        finally:  # inside the loop, so the engine thread never delivers to a closed one
            dispatcher.close()

    asyncio.run(main())
