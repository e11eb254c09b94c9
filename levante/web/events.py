"""Live updates for open Spaces: one Server-Sent Events stream per open page.

Stored changes (messages, notes) are read from the store's change log by each stream — after a
reconnect and live alike, one code path — and carry the log's id as the SSE id. Answer deltas and
credit updates are live only: a page that missed some gets the whole answer in the `message` event
that ends it."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from levante.web.store import Store

HEARTBEAT_SECONDS = 15.0
QUEUE_LIMIT = 2048  # events a slow page may lag behind before it is dropped (it reconnects and replays)
CHANGED = ""  # queued for a page when the change log grew


def frame(kind: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Hub:
    """Fans a Space's events out to the pages that have it open."""

    def __init__(self) -> None:
        self.pages: dict[str, set[asyncio.Queue[str | None]]] = defaultdict(set)

    def notify(self, space: str) -> None:
        """The Space's change log grew: every open page reads what is new."""
        self._put(space, CHANGED)

    def publish(self, space: str, kind: str, data: Any) -> None:
        """A live-only event (an answer's delta, the credits)."""
        self._put(space, frame(kind, data))

    def _put(self, space: str, text: str) -> None:
        for queue in list(self.pages.get(space, ())):
            if queue.qsize() >= QUEUE_LIMIT:
                queue.put_nowait(None)  # too far behind: end its stream; the browser reconnects
                self.pages[space].discard(queue)
            else:
                queue.put_nowait(text)

    async def stream(
        self,
        store: Store,
        space: str,
        after: int,
        render: Callable[[str, int], Any],
        stopping: Callable[[], bool],
        allowed: Callable[[], bool],
    ) -> AsyncIterator[str]:
        """The page's events: first what it missed since event `after` (the current state of each
        changed message or note), then live ones, until the server drains or — checked at each
        heartbeat — the member may no longer read the Space."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.pages[space].add(queue)  # before the replay, so nothing falls between the two
        queue.put_nowait(CHANGED)
        try:
            yield "retry: 1000\n\n"
            quiet = 0.0
            while not stopping():
                try:
                    text = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    quiet += 1.0
                    if quiet >= HEARTBEAT_SECONDS:  # a comment, so proxies keep an idle stream open
                        if not allowed():
                            return
                        quiet = 0.0
                        yield ": ping\n\n"
                    continue
                if text is None:
                    return
                quiet = 0.0
                if text != CHANGED:
                    yield text
                    continue
                for change in store.changes(space, after):
                    after = change.id
                    data = render(change.kind, change.ref)
                    if data is not None:  # None: gone since (a note changed, then deleted)
                        yield frame(change.kind, data, change.id)
        finally:
            self.pages[space].discard(queue)
