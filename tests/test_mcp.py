"""The MCP client layer against real MCP servers written with the SDK: launched over stdio (both
protocol eras) and served over Streamable HTTP, crashed, killed and brought back."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from servers import free_port

from levante.errors import LevanteError
from levante.mcp import HttpServer, MCPServers, StdioServer, ToolCallFailed, load_config

T = TypeVar("T")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))

SERVER = f"""
import asyncio, os, sys, time
from pathlib import Path

import anyio
from mcp import types
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

if "LEVANTE_TEST_PIDS" in os.environ:  # only there if the config's env reached us
    Path(os.environ["LEVANTE_TEST_PIDS"], str(os.getpid())).write_text(os.getcwd())

# "nolisten": a 2026 server that does not serve subscriptions/listen, so it cannot push changes.
listen = False if sys.argv[1] == "nolisten" else None
server = MCPServer("levante-test", log_level="CRITICAL", subscriptions=listen)


@server.tool()
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b


@server.tool()
def echo(text: str) -> str:
    return text


@server.tool()
def fail() -> str:
    raise ToolError("this tool always fails")


@server.tool()
async def sleep(seconds: float, marker: str = "") -> dict[str, float]:
    \"\"\"When it ran, so callers can see calls overlap; `marker` records a start and a cancellation.\"\"\"
    started = time.time()
    if marker:
        Path(marker).write_text("started")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if marker:
            Path(marker).write_text("cancelled")
        raise
    return {{"started": started, "ended": time.time()}}


@server.tool()
def crash() -> str:
    os._exit(1)


@server.tool()
def picture() -> Image:
    return Image(data={PNG!r}, format="png")


@server.tool()
def resources() -> list[types.ContentBlock]:
    text = types.TextResourceContents(uri="mem://greeting", text="hello")
    return [
        types.ResourceLink(type="resource_link", name="notes", uri="file:///notes.txt"),
        types.EmbeddedResource(type="resource", resource=text),
    ]


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    \"\"\"Register a tool and say so, to clients of both eras.\"\"\"
    server.add_tool(lambda: name, name=name, description="added at run time")
    await ctx.notify_tools_changed()  # 2026: subscriptions/listen streams
    await ctx.session.send_tool_list_changed()  # handshake era: a plain notification
    return name


@server.tool()
def token(ctx: Context) -> str:
    return ctx.request_context.request.headers.get("x-levante-token", "")


if sys.argv[1] == "http":
    import uvicorn

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
elif sys.argv[1] == "legacy":
    # Handshake only, like servers written before 2026: server/discover is refused.
    from mcp.server.runner import serve_loop
    from mcp.server.stdio import stdio_server

    async def serve() -> None:
        lowlevel = server._lowlevel_server
        async with stdio_server() as (read, write), lowlevel.lifespan(lowlevel) as state:
            options = lowlevel.create_initialization_options()
            await serve_loop(lowlevel, read, write, lifespan_state=state, init_options=options)

    anyio.run(serve)
else:
    server.run()
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mcp") / "server.py"
    path.write_text(SERVER)
    return path


def stdio(name: str, script: Path, mode: str = "stdio", **env: str) -> StdioServer:
    return StdioServer(name, sys.executable, (str(script), mode), env, script.parent)


class Loop:
    """An event loop in a thread: `MCPServers` lives in one loop for its whole life, as in uvicorn,
    and here several tests share one set of running servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def tool_names(servers: MCPServers, server: str) -> set[str]:
    return {tool.name for tool in servers.tools(server)}


def start_http(script: Path, port: int) -> subprocess.Popen[bytes]:
    """Serve the test tools over Streamable HTTP on `port`; return once the server answers."""
    proc = subprocess.Popen([sys.executable, str(script), "http", str(port)])
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/mcp", timeout=1)
            return proc
        except urllib.error.HTTPError:
            return proc  # an HTTP answer of any kind: it is serving
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the HTTP MCP server did not come up (exit {proc.poll()})") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def shared(script: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Loop, MCPServers]]:
    """A 2026 server and a handshake-era one over stdio, running for the tests that only call tools."""
    pids = tmp_path_factory.mktemp("pids")
    servers = MCPServers(
        [
            stdio("modern", script, LEVANTE_TEST_PIDS=str(pids)),
            stdio("legacy", script, "legacy", LEVANTE_TEST_PIDS=str(pids)),
        ]
    )
    loop = Loop()
    loop.run(servers.start())
    yield loop, servers
    loop.run(servers.stop())
    loop.run(servers.stop())  # idempotent
    loop.close()
    started = {int(p.name): p.read_text() for p in pids.iterdir()}
    assert len(started) == 2 and set(started.values()) == {str(script.parent)}  # env and cwd reached them
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stop() ended (and reaped) every child


def test_config(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "files": {"command": "npx", "args": ["-y", "server-files", "/data"], "env": {"A": "1"}},
                    "tools_2": {"command": "./serve", "cwd": "srv", "type": "stdio"},
                    "remote": {
                        "url": "https://mcp.example.com/mcp",
                        "headers": {"Authorization": "Bearer x"},
                    },
                }
            }
        )
    )
    assert load_config(path) == [
        StdioServer("files", "npx", ("-y", "server-files", "/data"), {"A": "1"}, None),
        StdioServer("tools_2", "./serve", (), {}, tmp_path / "srv"),
        HttpServer("remote", "https://mcp.example.com/mcp", {"Authorization": "Bearer x"}),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"servers": {}}', '"mcpServers" object'),
        ('{"mcpServers": []}', "mcpServers must be an object"),
        ('{"mcpServers": {"files": []}}', "mcpServers.files must be an object"),
        ('{"mcpServers": {"files": {}}}', "mcpServers.files needs exactly one of command"),
        (
            '{"mcpServers": {"files": {"command": "x", "url": "http://h"}}}',
            "mcpServers.files needs exactly one",
        ),
        ('{"mcpServers": {"files": {"command": ""}}}', "mcpServers.files.command must be a non-empty string"),
        ('{"mcpServers": {"files": {"command": "x", "args": "-y"}}}', "mcpServers.files.args must be a list"),
        ('{"mcpServers": {"files": {"command": "x", "args": [1]}}}', "mcpServers.files.args must be a list"),
        (
            '{"mcpServers": {"files": {"command": "x", "env": {"N": 1}}}}',
            "mcpServers.files.env.N must be a string",
        ),
        ('{"mcpServers": {"files": {"command": "x", "cwd": 3}}}', "mcpServers.files.cwd must be a non-empty"),
        ('{"mcpServers": {"my files": {"command": "x"}}}', 'mcpServers."my files": a server name may only'),
        (
            '{"mcpServers": {"web": {"url": "ftp://h/mcp"}}}',
            "mcpServers.web.url must be an http:// or https://",
        ),
        ('{"mcpServers": {"web": {"url": "localhost:8000"}}}', "mcpServers.web.url must be an http"),
        (
            '{"mcpServers": {"web": {"url": "http://h", "headers": []}}}',
            "mcpServers.web.headers must be an object",
        ),
    ],
)
def test_config_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(LevanteError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(LevanteError, match="cannot read"):
        load_config(tmp_path / "missing.json")


def test_tools_are_listed(shared: tuple[Loop, MCPServers]) -> None:
    _, servers = shared
    assert servers.names() == ["modern", "legacy"]
    for name in servers.names():
        assert servers.status()[name] == {"state": "ready", "tools": 9, "restarts": 0, "error": None}
        add = next(tool for tool in servers.tools(name) if tool.name == "add")
        assert (add.server, add.description) == (name, "Add two integers.")
        assert set(add.input_schema["properties"]) == {"a", "b"}
    with pytest.raises(LookupError, match="no MCP server named 'nope'"):
        servers.tools("nope")


def test_calls(shared: tuple[Loop, MCPServers]) -> None:
    loop, servers = shared
    for name in servers.names():
        added = loop.run(servers.call(name, "add", {"a": 2, "b": 3}))
        assert (added.content, added.is_error, added.structured) == (
            [{"type": "text", "text": "5"}],
            False,
            {"result": 5},
        )
        assert loop.run(servers.call(name, "echo", {"text": "olá"})).content == [
            {"type": "text", "text": "olá"}
        ]
        failed = loop.run(servers.call(name, "fail", {}))
        assert failed.is_error and "this tool always fails" in failed.content[0]["text"]
    picture = loop.run(servers.call("modern", "picture", {})).content
    assert picture == [{"type": "image", "data": base64.b64encode(PNG).decode(), "mime_type": "image/png"}]
    assert loop.run(servers.call("modern", "resources", {})).content == [
        {"type": "text", "text": "[resource notes: file:///notes.txt]"},
        {"type": "text", "text": "hello"},
    ]
    with pytest.raises(LookupError):
        loop.run(servers.call("nope", "add", {}))


def test_timeout(shared: tuple[Loop, MCPServers]) -> None:
    loop, servers = shared
    with pytest.raises(ToolCallFailed, match=r"no answer within 0\.3 s"):
        loop.run(servers.call("modern", "sleep", {"seconds": 10}, timeout=0.3))
    assert servers.status()["modern"]["state"] == "ready"  # a slow tool is not a dead server


def test_parallel_calls(shared: tuple[Loop, MCPServers]) -> None:
    loop, servers = shared

    async def four() -> list[Any]:
        calls = [servers.call(name, "sleep", {"seconds": 0.5}) for name in ("modern", "legacy") * 2]
        return [result.structured for result in await asyncio.gather(*calls)]

    runs = loop.run(four())
    assert max(run["started"] for run in runs) < min(run["ended"] for run in runs)  # all four ran at once


def test_cancelling_the_caller_cancels_the_tool(shared: tuple[Loop, MCPServers], tmp_path: Path) -> None:
    loop, servers = shared

    async def cancel(server: str) -> float:
        marker = tmp_path / f"{server}.marker"
        call = asyncio.create_task(servers.call(server, "sleep", {"seconds": 30, "marker": str(marker)}))
        await until(marker.exists)  # the tool is running on the server
        call.cancel()
        began = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await call
        took = time.monotonic() - began
        await until(lambda: marker.read_text() == "cancelled")  # the server stopped the tool
        return took

    for server in servers.names():
        assert loop.run(cancel(server)) < 2


def test_tool_list_changes(shared: tuple[Loop, MCPServers]) -> None:
    loop, servers = shared
    for name in servers.names():
        loop.run(servers.call(name, "grow", {"name": f"grown_{name}"}))
        loop.run(until(lambda name=name: f"grown_{name}" in tool_names(servers, name)))


def test_crash_restarts(script: Path, caplog: pytest.LogCaptureFixture) -> None:
    servers = MCPServers(
        [stdio("modern", script), stdio("legacy", script, "legacy"), stdio("nolisten", script, "nolisten")]
    )

    async def scenario() -> None:
        await servers.start()
        try:
            for name in servers.names():
                with pytest.raises(ToolCallFailed, match="went away"):
                    await servers.call(name, "crash", {})
            await until(
                lambda: all(s["restarts"] == 1 and s["state"] == "ready" for s in servers.status().values())
            )
            for name, status in servers.status().items():
                assert status == {"state": "ready", "tools": 9, "restarts": 1, "error": None}
                assert (await servers.call(name, "add", {"a": 1, "b": 1})).structured == {"result": 2}
        finally:
            await servers.stop()

    caplog.set_level(logging.INFO, logger="levante.mcp")
    asyncio.run(scenario())
    assert "MCP server 'nolisten' does not stream changes" in caplog.text


def test_http_server(script: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    servers = MCPServers([HttpServer("remote", url, {"X-Levante-Token": "s3cret"})])
    proc = start_http(script, port)

    async def scenario() -> None:
        nonlocal proc
        await servers.start()
        try:
            assert "add" in tool_names(servers, "remote")
            assert (await servers.call("remote", "token", {})).content == [{"type": "text", "text": "s3cret"}]
            await servers.call("remote", "grow", {"name": "grown"})
            await until(lambda: "grown" in tool_names(servers, "remote"))

            proc.kill()
            proc.wait()
            await until(lambda: servers.status()["remote"]["state"] == "failed")
            assert servers.tools("remote") == []
            with pytest.raises(ToolCallFailed, match="not connected"):
                await servers.call("remote", "add", {"a": 1, "b": 1})

            proc = await asyncio.to_thread(start_http, script, port)
            await until(lambda: servers.status()["remote"]["state"] == "ready")
            assert servers.status()["remote"]["restarts"] >= 1
            assert (await servers.call("remote", "add", {"a": 1, "b": 1})).structured == {"result": 2}
        finally:
            await servers.stop()

    caplog.set_level(logging.INFO, logger="levante.mcp")
    try:
        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()
    lost = [
        r.getMessage()
        for r in caplog.records
        if r.name == "levante.mcp" and "lost its connection" in r.message
    ]
    assert len(lost) == 1 and "'remote'" in lost[0]


def test_broken_servers_do_not_block_start(caplog: pytest.LogCaptureFixture) -> None:
    servers = MCPServers(
        [
            StdioServer("missing", "levante-no-such-command", (), {}, None),
            StdioServer("mute", sys.executable, ("-c", "import sys; sys.stdin.read()"), {}, None),
        ],
        connect_timeout=1,
    )

    async def scenario() -> float:
        began = time.monotonic()
        await servers.start()
        took = time.monotonic() - began
        try:
            await until(lambda: all(s["state"] == "failed" for s in servers.status().values()))
            with pytest.raises(ToolCallFailed, match="not connected: FileNotFoundError"):
                await servers.call("missing", "add", {})
        finally:
            await servers.stop()
        return took

    caplog.set_level(logging.INFO, logger="levante.mcp")
    assert asyncio.run(scenario()) < 3
    status = servers.status()
    assert "levante-no-such-command" in status["missing"]["error"]
    assert status["mute"]["error"] == "no answer within 1 s"
    failures = [
        r.getMessage() for r in caplog.records if r.name == "levante.mcp" and r.levelname == "WARNING"
    ]
    assert any("'missing' could not connect" in m and "levante-no-such-command" in m for m in failures)
