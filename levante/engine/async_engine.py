"""The engine behind asyncio: one background thread runs steps while there is work; each request
gets an async iterator of deltas. Leaving the iterator early (a client that went away) aborts the
request and frees its blocks at once."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from levante.engine.engine import Engine, Output
from levante.engine.sampling_params import SamplingParams
from levante.tokenizer import PromptInputs


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards the engine between the step thread and callers
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="levante-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    outputs = self.engine.step() if busy else []
                except Exception as e:  # a bug must fail the requests in flight, not hang them
                    self._fail_all(e)
                    outputs = []
            for out in outputs:
                self._deliver(out.request_id, out)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _deliver(self, request_id: str, item: Any) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self._queues):
            self.engine.abort(rid)
            self._deliver(rid, error)

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Output]:
        """Yields deltas until every one of the request's n sequences has finished."""
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(rid, prompt, params)  # raises RequestError before anything runs
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            self._queues.pop(rid, None)
            if remaining:
                self.abort(rid)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.engine.abort(request_id)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
