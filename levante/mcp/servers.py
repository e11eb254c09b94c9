"""The operator's MCP servers, kept connected for the life of the HTTP server.

One supervisor task per server owns its `mcp.Client` (the SDK requires the task that entered a
client to exit it): it connects, lists the tools, follows tool-list changes, notices when the server
dies and reconnects with exponential backoff. Request tasks call tools through the live client, many
at once; cancelling one cancels the call on the server."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx2
from mcp import Client, MCPError, StdioServerParameters, types
from mcp.client import IncomingMessage, Transport
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import SubscriptionLost
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from levante.mcp.config import HttpServer, StdioServer

log = logging.getLogger("levante.mcp")

_PROBE_INTERVAL_S = 5.0
"""How often a server that cannot tell us it is gone is checked: handshake-era servers are pinged,
2026 servers without subscriptions/listen have their tools listed again."""
_BACKOFF_CAP_S = 60.0
_STABLE_S = 60.0
"""A connection that lived this long was healthy, so its loss starts the backoff again at 1 s."""
_SSE_READ_TIMEOUT_S = 300.0
"""HTTP read timeout (the SDK's default): the change stream stays open with nothing to read."""
_MAX_PAGES = 100
"""tools/list pages we follow before calling the server broken rather than looping forever."""


@dataclass(frozen=True)
class Tool:
    server: str
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class CallResult:
    """A tool's answer. `is_error` is the tool's own failure, for the model to read and react to.
    `content` items are `{"type": "text", "text"}` or `{"type": "image", "data" (base64),
    "mime_type"}`: every other kind is turned into a text item describing it."""

    content: list[dict[str, str]]
    is_error: bool
    structured: Any


class ToolCallFailed(Exception):
    """The call produced no result: the server is down, crashed during the call, did not answer
    in time, or broke the protocol."""


@dataclass(eq=False)
class _Supervised:
    """One configured server and what its supervisor has found out about it."""

    server: StdioServer | HttpServer
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the first attempt is over
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # a call saw the connection close
    client: Client | None = None
    tools: list[Tool] = field(default_factory=list)
    state: Literal["starting", "ready", "failed"] = "starting"
    error: str | None = None
    restarts: int = 0
    ready_since: float = 0.0


class MCPServers:
    """Every configured server, from `start` to `stop`, all in the event loop that calls them.
    `connect_timeout` bounds a connection attempt and every request but a tool call."""

    def __init__(
        self,
        servers: Sequence[StdioServer | HttpServer],
        call_timeout: float = 60.0,
        connect_timeout: float = 20.0,
    ) -> None:
        self._servers = {server.name: _Supervised(server) for server in servers}
        if len(self._servers) != len(servers):
            raise ValueError("MCP server names must be unique")
        self._call_timeout = call_timeout
        self._connect_timeout = connect_timeout
        self._scopes: list[anyio.CancelScope] = []  # one per supervisor, cancelled by stop()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every supervisor; return once each server is ready or has failed its first
        attempt, and never later than `connect_timeout`: a broken MCP server must not keep the
        model server from starting. Failed servers keep being retried in the background."""
        # Cancel scopes rather than Task.cancel(): the SDK shields the stdio child's shutdown from
        # anyio cancellation, which a native cancel would cut short and leave the process behind.
        self._scopes = [anyio.CancelScope() for _ in self._servers]
        self._tasks = [
            asyncio.create_task(self._supervise(s, scope), name=f"mcp-{name}")
            for (name, s), scope in zip(self._servers.items(), self._scopes, strict=True)
        ]
        with anyio.move_on_after(self._connect_timeout):
            for s in self._servers.values():
                await s.settled.wait()

    async def stop(self) -> None:
        """Disconnect every server and end its child process. Safe to call more than once."""
        for scope in self._scopes:
            scope.cancel()
        await asyncio.gather(*self._tasks)

    def names(self) -> list[str]:
        return list(self._servers)

    def tools(self, server: str) -> list[Tool]:
        """The server's tools as last listed; empty while it is down."""
        return list(self._get(server).tools)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per server: state, tool count, restarts and the last error, for /health and /metrics."""
        return {
            name: {"state": s.state, "tools": len(s.tools), "restarts": s.restarts, "error": s.error}
            for name, s in self._servers.items()
        }

    async def call(
        self, server: str, tool: str, arguments: dict[str, Any], timeout: float | None = None
    ) -> CallResult:
        """Run one tool (default timeout: `call_timeout`). A tool that raises gives an `is_error`
        result; `ToolCallFailed` means there is no result at all."""
        s = self._get(server)
        client = s.client
        if client is None:
            raise ToolCallFailed(
                f"MCP server {server!r} is not connected" + (f": {s.error}" if s.error else "")
            )
        seconds = self._call_timeout if timeout is None else timeout
        what = f"tool {tool!r} on MCP server {server!r}"
        # The call runs in a task of its own, cancelled once and natively when its caller is: a
        # caller inside a cancelled anyio scope (Starlette's, when an HTTP client leaves) would
        # cancel every await of the SDK's cleanup too, and the server would never hear of it.
        running = asyncio.ensure_future(client.call_tool(tool, arguments, read_timeout_seconds=seconds))
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError:
            running.cancel()
            raise
        except MCPError as e:
            if e.code == types.REQUEST_TIMEOUT:
                raise ToolCallFailed(f"{what} gave no answer within {seconds:g} s") from e
            if e.code == types.CONNECTION_CLOSED:
                s.poke.set()  # let a handshake-era server's supervisor notice now, not at the next ping
                raise ToolCallFailed(f"{what}: the server went away during the call ({e})") from e
            raise ToolCallFailed(f"{what} failed: {e}") from e
        except (RuntimeError, ValidationError) as e:
            # A result that breaks the protocol or the tool's output schema, or the client closing under us.
            raise ToolCallFailed(f"{what} failed: {e}") from e
        content = [_content(block) for block in result.content]
        return CallResult(content, result.is_error, result.structured_content)

    def _get(self, server: str) -> _Supervised:
        try:
            return self._servers[server]
        except KeyError:
            known = ", ".join(self._servers) or "none"
            raise LookupError(f"no MCP server named {server!r} (configured: {known})") from None

    async def _supervise(self, s: _Supervised, scope: anyio.CancelScope) -> None:
        """Keep one server connected until `stop`, logging each loss once and reconnecting after
        1 s, 2 s, 4 s ... up to a minute."""
        failures = 0
        with scope:
            while True:
                reason = await self._connection(s)
                was_ready = s.state == "ready"
                if was_ready and time.monotonic() - s.ready_since >= _STABLE_S:
                    failures = 0
                failures += 1
                delay = min(_BACKOFF_CAP_S, 2.0 ** (failures - 1))
                s.state, s.error, s.tools = "failed", reason, []
                s.settled.set()
                what = "lost its connection" if was_ready else "could not connect"
                log.warning("MCP server %r %s: %s; retrying in %g s", s.server.name, what, reason, delay)
                await anyio.sleep(delay)
                s.restarts += 1

    async def _connection(self, s: _Supervised) -> str:
        """One connection, from launch to loss; returns why it ended (it does not end otherwise)."""
        changed = asyncio.Event()

        async def on_message(message: IncomingMessage) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                changed.set()

        try:
            with anyio.CancelScope(deadline=anyio.current_time() + self._connect_timeout) as connecting:
                async with _client(s.server, self._connect_timeout, on_message) as client:
                    s.tools = await _list_tools(s.server.name, client)
                    connecting.deadline = math.inf
                    self._ready(s, client)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_follow, s, client, changed)
                            await _watch(s, client, changed)
                    finally:
                        s.client = None
        except Exception as e:  # whatever ended the connection is a reason to reconnect, not to stop
            return _describe(e)
        return f"no answer within {self._connect_timeout:g} s"

    def _ready(self, s: _Supervised, client: Client) -> None:
        s.client, s.state, s.error, s.ready_since = client, "ready", None, time.monotonic()
        s.poke.clear()
        s.settled.set()
        again = f" again (restart {s.restarts})" if s.restarts else ""
        log.info("MCP server %r is ready%s with %d tools", s.server.name, again, len(s.tools))


@asynccontextmanager
async def _client(
    server: StdioServer | HttpServer, timeout: float, on_message: Callable[[IncomingMessage], Awaitable[None]]
) -> AsyncIterator[Client]:
    """A connected client. Over HTTP the headers ride on our own httpx2 client: the SDK takes
    no headers itself, and its default client would not time out a connect in `timeout`."""
    async with AsyncExitStack() as stack:
        target: StdioServerParameters | Transport
        if isinstance(server, StdioServer):
            target = StdioServerParameters(
                command=server.command, args=list(server.args), env=server.env, cwd=server.cwd
            )
        else:
            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers=server.headers, timeout=httpx2.Timeout(timeout, read=_SSE_READ_TIMEOUT_S)
                )
            )
            target = streamable_http_client(server.url, http_client=http)
        # cache=None: a listing is fetched again only because it changed, so never serve it from a cache.
        client = Client(target, message_handler=on_message, read_timeout_seconds=timeout, cache=None)
        yield await stack.enter_async_context(client)


async def _list_tools(server: str, client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += [Tool(server, t.name, t.description or "", t.input_schema) for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise RuntimeError(f"tools/list still had more pages after {_MAX_PAGES}")


async def _refresh(s: _Supervised, client: Client) -> None:
    tools = await _list_tools(s.server.name, client)
    if tools != s.tools:
        s.tools = tools
        log.info("MCP server %r now has %d tools", s.server.name, len(tools))


async def _follow(s: _Supervised, client: Client, changed: asyncio.Event) -> None:
    """List the tools again each time they change; a failed listing ends the connection."""
    while True:
        await changed.wait()
        changed.clear()
        await _refresh(s, client)


async def _watch(s: _Supervised, client: Client, changed: asyncio.Event) -> None:
    """Raise once the server is gone. Handshake-era servers push tool-list changes as plain
    notifications (see `on_message`) and answer pings; 2026 servers have no ping."""
    if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
        await _listen(s, client, changed)
    else:
        await _probe(s.poke, client.session.send_ping)


async def _listen(s: _Supervised, client: Client, changed: asyncio.Event) -> None:
    """A 2026 server pushes changes only on a subscriptions/listen stream, which breaks when the
    connection does (the process exits, the HTTP stream drops). One that does not serve the
    stream has its tools listed every few seconds instead."""
    while True:
        try:
            async with client.listen(tools_list_changed=True) as stream:
                async for _ in stream:
                    changed.set()
        except MCPError as e:
            if e.code == types.CONNECTION_CLOSED:
                raise
            log.info("MCP server %r does not stream changes (%s): polling its tools", s.server.name, e)
            break
        # The server closed the stream on purpose (e.g. shedding listeners). Nothing is replayed,
        # so listen again and list the tools in case they changed in between.
        await anyio.sleep(_PROBE_INTERVAL_S)
        changed.set()
    await _probe(s.poke, lambda: _refresh(s, client))


async def _probe(poke: asyncio.Event, probe: Callable[[], Awaitable[object]]) -> None:
    """Probe the server every few seconds, and at once when a call saw the connection close;
    raise when a probe fails."""
    while True:
        with anyio.move_on_after(_PROBE_INTERVAL_S):
            await poke.wait()
        poke.clear()
        await probe()


def _content(block: types.ContentBlock) -> dict[str, str]:
    """Text and images go to the model as they are; anything else becomes a text item saying what it was."""
    match block:
        case types.TextContent():
            return {"type": "text", "text": block.text}
        case types.ImageContent():
            return {"type": "image", "data": block.data, "mime_type": block.mime_type}
        case types.EmbeddedResource(resource=types.TextResourceContents() as resource):
            return {"type": "text", "text": resource.text}
        case types.EmbeddedResource(resource=resource):
            return {"type": "text", "text": f"[binary resource {resource.uri} ({resource.mime_type})]"}
        case types.ResourceLink():
            return {"type": "text", "text": f"[resource {block.name}: {block.uri}]"}
        case _:
            return {"type": "text", "text": f"[{block.type} content ({block.mime_type}) omitted]"}


def _describe(e: BaseException) -> str:
    """One line for the log and /health: the underlying errors, without task-group wrapping."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(inner) for inner in e.exceptions))
    if isinstance(e, SubscriptionLost) and e.__cause__ is not None:
        return _describe(e.__cause__)  # the change stream broke because the connection did
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
