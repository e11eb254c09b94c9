"""The engine behind asyncio. One background thread owns the engine: it runs the commands callers
queue (admit, abort) between steps and steps while there is work, so the event loop never waits
for a forward pass. Each request gets an async iterator of deltas; leaving it early (a client that
went away) aborts the request and frees its blocks before the next step."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from levante.engine.engine import Engine, Output
from levante.engine.sampling_params import SamplingParams
from levante.tokenizer import PromptInputs

log = logging.getLogger(__name__)

_IDLE_WAIT = 0.5  # seconds the idle thread sleeps between checks for close()


def _settle(future: asyncio.Future[Any], error: Exception | None) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(error)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._thread = threading.Thread(target=self._loop, name="levante-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                while True:  # every queued command, waiting for the first one only when idle
                    command = self._commands.get(block=block, timeout=_IDLE_WAIT if block else None)
                    if command is None:
                        return
                    command()
                    block = False
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must fail the requests in flight, not hang them
                log.exception("engine step failed; failing every request in flight")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: Output | Exception) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._deliver(rid, error)

    # ---- callers (any event loop) ---------------------------------------------------------

    async def add_request(
        self, prompt: PromptInputs, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Output]:
        """Admits a request, raising the engine's RequestError at once if it can never run, and
        returns its deltas: they end when every one of its n sequences has finished."""
        rid = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        admitted: asyncio.Future[Exception | None] = loop.create_future()
        stream: asyncio.Queue[Any] = asyncio.Queue()

        def admit() -> None:
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:
                loop.call_soon_threadsafe(_settle, admitted, e)
                return
            self._streams[rid] = (loop, stream)
            loop.call_soon_threadsafe(_settle, admitted, None)

        self._commands.put(admit)
        try:
            error = await admitted
        except asyncio.CancelledError:
            self.abort(rid)  # it may have been admitted just before the caller went away
            raise
        if error is not None:
            raise error
        return self._deltas(rid, stream, params.n)

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Output]:
        """`add_request` and its deltas in one iterator."""
        async for out in await self.add_request(prompt, params, request_id):
            yield out

    async def _deltas(self, rid: str, stream: asyncio.Queue[Any], n: int) -> AsyncIterator[Output]:
        remaining = n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            if remaining:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Frees the request's blocks before the next step; a no-op once it has finished."""
        self._streams.pop(request_id, None)
        self._commands.put(lambda: self.engine.abort(request_id) and None)

    @property
    def num_queued(self) -> int:
        """Sequences waiting for a place in the batch, plus admissions not yet processed."""
        return len(self.engine.scheduler.waiting) + self._commands.qsize()

    def close(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=5)
