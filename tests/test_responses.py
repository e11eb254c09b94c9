"""OpenAI's Responses API on a real server (tiny Mistral3, whose tool calls are grammar-constrained),
driven by the official `openai` client, with a real MCP server (stdio, written here) that the
server runs tools on: function tools round-trip through the client, MCP tools run in the loop,
approvals, failing and hanging tools, the round limit, the pool running out between rounds,
stored responses and streaming events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from agents import (
    Agent,
    HostedMCPTool,
    MaxTurnsExceeded,
    ModelBehaviorError,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from PIL import Image
from playwright.sync_api import Browser, expect
from servers import ServerProcess, post
from test_metering import levante, new_key
from test_web import Member, api, new_space

TOOLS_SERVER = '''
import asyncio
import os
from pathlib import Path
from typing import Annotated, Literal
from pydantic import Field
from mcp.server.mcpserver import Image, MCPServer

server = MCPServer("tools")
Digit = Annotated[int, Field(ge=0, le=9)]

@server.tool()
def add(a: Digit, b: Digit) -> str:
    """Adds two digits."""
    return f"{a} + {b} = {a + b}"

@server.tool()
def fail(reason: Literal["always"]) -> str:
    """Always fails."""
    raise ValueError("this tool always fails")

@server.tool()
async def hang(reason: Literal["forever"]) -> str:
    """Never returns; notes it when the call is cancelled."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        Path(os.environ["CANCELLED_MARKER"]).write_text("cancelled")
        raise
    return "never"

@server.tool()
def small_picture() -> Image:
    """A plain 112x112 picture."""
    return Image(data=Path(os.environ["PICTURES"], "112.png").read_bytes(), format="png")

@server.tool()
def large_picture() -> Image:
    """A plain 224x224 picture."""
    return Image(data=Path(os.environ["PICTURES"], "224.png").read_bytes(), format="png")

@server.tool()
def crash(reason: Literal["now"]) -> str:
    """Takes the whole server down."""
    os._exit(1)

server.run("stdio")
'''


@dataclass
class Served:
    home: Path
    server: ServerProcess
    db: Path
    key: str
    client: openai.OpenAI


@pytest.fixture(scope="module")
def served(tiny_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("responses")
    model = home / "tiny"
    shutil.copytree(tiny_mistral, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    script = home / "tools_server.py"
    script.write_text(TOOLS_SERVER)
    config = home / "mcp.json"
    for side in (112, 224):
        Image.new("RGB", (side, side), (30, 120, 200)).save(home / f"{side}.png")
    env = {"CANCELLED_MARKER": str(home / "cancelled"), "PICTURES": str(home)}
    tools = {"command": sys.executable, "args": [str(script)], "env": env}
    config.write_text(json.dumps({"mcpServers": {"tools": tools}}))
    db = home / "usage.db"
    key = new_key(db, "lab", "ana")
    args = ["--model", str(model), "--kv-cache-memory", "0.05", "--served-model-name", "tiny"]
    args += [
        "--usage-db",
        str(db),
        "--mcp-config",
        str(config),
        "--max-tool-rounds",
        "3",
        "--tool-timeout",
        "4",
        "--space-max-tokens",
        "200",
    ]
    server = ServerProcess(args, home / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)
        yield Served(home, server, db, key, client)
    finally:
        server.stop()


def mcp_tool(**extra: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "tools", "require_approval": "never", **extra}


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def call_tool(
    client: openai.OpenAI, tool: str, prompt: str, tokens: int, approval: str = "never", **extra: Any
) -> Any:
    """A response that must call the MCP tool `tool`, one call a round."""
    return client.responses.create(
        model="tiny",
        input=prompt,
        tools=[mcp_tool(allowed_tools=[tool], require_approval=approval)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=tokens,
        **extra,
    )


def items(response: Any, kind: str) -> list[Any]:
    return [item for item in response.output if item.type == kind]


def test_text_stored_and_continued(served: Served) -> None:
    first = served.client.responses.create(model="tiny", input="Hello there", max_output_tokens=6)
    assert first.status in ("completed", "incomplete") and first.object == "response"
    assert first.output_text and first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    again = served.client.responses.retrieve(first.id)
    assert again.output_text == first.output_text
    follow = served.client.responses.create(
        model="tiny",
        input="And then?",
        previous_response_id=first.id,
        max_output_tokens=6,
        instructions="Be brief.",
    )
    assert follow.usage.input_tokens > first.usage.input_tokens  # it read the first turn too
    with pytest.raises(openai.NotFoundError):
        served.client.responses.create(model="tiny", input="x", previous_response_id="resp_missing")


def test_function_tool_round_trip(served: Served) -> None:
    asked = served.client.responses.create(
        model="tiny",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=30,
    )
    (call,) = items(asked, "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Lyon")
    answered = served.client.responses.create(
        model="tiny",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=5,
    )
    assert answered.output_text and not items(answered, "function_call")
    assert answered.usage.input_tokens > asked.usage.input_tokens  # the call and its result were read


def test_mcp_tools_run_in_the_loop_until_the_round_limit(served: Served) -> None:
    before = len(ledger(served.db))
    response = call_tool(served.client, "add", "Add some digits.", 300)
    (listed,) = items(response, "mcp_list_tools")
    assert [t.name for t in listed.tools] == ["add"]  # allowed_tools honoured
    calls = items(response, "mcp_call")
    assert len(calls) == 3 and all(c.name == "add" and c.server_label == "tools" for c in calls)
    for c in calls:
        args = json.loads(c.arguments)
        assert c.error is None and c.output == f"{args['a']} + {args['b']} = {args['a'] + args['b']}"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_tool_rounds"
    rows = ledger(served.db)[before:]
    assert len(rows) == 3 and all(r["key_name"] == "ana" and r["endpoint"] == "responses" for r in rows)
    assert response.usage.input_tokens == sum(r["prompt_tokens"] for r in rows)  # every round metered


def test_parallel_calls_run_and_a_cut_off_call_is_not(served: Served) -> None:
    response = served.client.responses.create(
        model="tiny",
        input="Add several pairs.",
        tools=[mcp_tool(allowed_tools=["add"])],
        tool_choice="required",
        max_output_tokens=60,
    )
    calls = items(response, "mcp_call")
    done = [c for c in calls if c.error is None]
    assert len(done) >= 2  # several calls of one round, run together
    for c in done:
        args = json.loads(c.arguments)
        assert c.output == f"{args['a']} + {args['b']} = {args['a'] + args['b']}"
    if response.status == "incomplete":  # the random model kept calling until the output ran out
        assert response.incomplete_details.reason == "max_output_tokens"
        assert all(c.error == "the call was cut off at max_output_tokens" for c in calls if c.error)


def test_an_image_a_tool_returns_reaches_the_model(served: Served) -> None:
    """The round after a call reads its result, images as images: a 224x224 picture grows the next
    prompt by 4x the image tokens a 112x112 one does (tiny Mistral3: 14-pixel patches merged 2x2,
    so 16 tokens against 64 and a break per row), the text around them being the same."""
    grown = {}
    for tool in ("small_picture", "large_picture"):
        before = len(ledger(served.db))
        response = served.client.responses.create(
            model="tiny",
            input="Go.",
            tools=[mcp_tool(allowed_tools=[tool])],
            tool_choice={"type": "function", "name": f"tools_{tool}"},
            parallel_tool_calls=False,
            max_output_tokens=40,
        )
        assert items(response, "mcp_call")[0].error is None
        first, second = ledger(served.db)[before : before + 2]
        grown[tool] = second["prompt_tokens"] - first["prompt_tokens"]
    assert grown["large_picture"] - grown["small_picture"] >= 64 - 16


def test_failing_and_hanging_tools_are_reported_to_the_model(served: Served) -> None:
    for tool, complaint in (("fail", "fail"), ("hang", "no answer within 4 s")):
        response = call_tool(served.client, tool, "Try it.", 30)
        call = items(response, "mcp_call")[0]
        assert call.output is None and complaint in call.error, (tool, call.error)


def test_a_crashing_server_fails_the_call_and_comes_back(served: Served) -> None:
    response = call_tool(served.client, "crash", "Crash it.", 30)
    call = items(response, "mcp_call")[0]
    assert call.output is None and "went away" in call.error, call.error
    deadline = time.monotonic() + 30
    while (state := health(served)["tools"])["state"] != "ready" or state["restarts"] < 1:
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_a_client_leaving_mid_call_cancels_the_tool(served: Served) -> None:
    marker = served.home / "cancelled"
    marker.unlink(missing_ok=True)
    stream = call_tool(served.client, "hang", "Wait.", 30, stream=True)
    for event in stream:
        if event.type == "response.mcp_call.in_progress":
            break
    stream.close()  # the client goes away while the tool runs
    left = time.monotonic()
    while not marker.exists():  # cancelled on the MCP server, well before the 4 s call timeout
        assert time.monotonic() - left < 3, "the tool call was not cancelled"
        time.sleep(0.05)


def test_approval_flow(served: Served) -> None:
    asked = call_tool(served.client, "add", "Add digits.", 300, approval="always")
    (request,) = items(asked, "mcp_approval_request")
    assert request.name == "add" and not items(asked, "mcp_call")  # nothing ran unapproved
    approved = served.client.responses.create(
        model="tiny",
        previous_response_id=asked.id,
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}],
        tools=[mcp_tool(allowed_tools=["add"], require_approval="always")],
        tool_choice="none",
        max_output_tokens=5,
    )
    (call,) = items(approved, "mcp_call")
    args = json.loads(request.arguments)
    assert call.output == f"{args['a']} + {args['b']} = {args['a'] + args['b']}"
    with pytest.raises(openai.BadRequestError, match="already answered"):  # one approval runs one call
        served.client.responses.create(
            model="tiny",
            previous_response_id=approved.id,
            input=[{"type": "mcp_approval_response", "approval_request_id": request.id, "approve": True}],
            tools=[mcp_tool(allowed_tools=["add"], require_approval="always")],
        )


def test_streamed_events_in_order(served: Served) -> None:
    stream = call_tool(served.client, "add", "Add digits.", 300, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:6] == [
        "response.output_item.added",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.output_item.done",
    ]
    assert "response.mcp_call.in_progress" in kinds and "response.mcp_call.completed" in kinds
    assert kinds.index("response.mcp_call.in_progress") < kinds.index("response.mcp_call.completed")
    assert kinds[-1] == "response.incomplete"
    final = events[-1].response
    assert len(items(final, "mcp_call")) == 3


def test_the_pool_running_out_between_rounds_fails_the_response(served: Served) -> None:
    team_key = new_key(served.db, "small", "bo")
    assert levante(served.db, "keys", "set-budget", "--team", "small", "0.0000000001").returncode == 0
    client = openai.OpenAI(base_url=f"{served.server.url}/v1", api_key=team_key, max_retries=0, timeout=120)
    response = call_tool(client, "add", "Add.", 300)
    assert response.status == "failed" and response.error.code == "budget_exceeded"
    assert len(items(response, "mcp_call")) == 1  # the first round ran, the second was refused
    with pytest.raises(openai.RateLimitError):  # and now the request itself is refused
        client.responses.create(model="tiny", input="Again.")


def test_bad_requests_name_the_field(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.key}"}
    cases = [
        (
            {"input": "x", "tools": [{"type": "mcp", "server_label": "x", "server_url": "http://10.0.0.1/"}]},
            "tools[0].server_url",
        ),
        ({"input": "x", "tools": [{"type": "mcp", "server_label": "nope"}]}, "tools[0].server_label"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "telepathy"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        (
            {
                "input": [
                    {
                        "type": "mcp_approval_request",
                        "id": "mcpr_1",
                        "server_label": "tools",
                        "name": "add",
                        "arguments": "{}",
                    },
                    {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": "yes"},
                ],
                "tools": [{"type": "mcp", "server_label": "tools", "require_approval": "always"}],
            },
            "input[1].approve",
        ),
        ({"input": "x", "temperature": 5}, "temperature"),
        ({"input": "x", "reasoning_effort": "high"}, "reasoning_effort"),
        (
            {"input": [{"type": "mcp_approval_response", "approval_request_id": "nope", "approve": True}]},
            "input[0].approval_request_id",
        ),
    ]
    for body, param in cases:
        status, error = post(served.server.url, "/v1/responses", {"model": "tiny", **body}, headers)
        assert status == 400 and error["error"]["param"] == param, (body, status, error)
    assert health(served)["tools"]["state"] == "ready"  # /health reports the MCP servers, up or not


def health(served: Served) -> dict[str, Any]:
    with urllib.request.urlopen(f"{served.server.url}/health") as resp:
        return json.load(resp)["mcp"]


def ledger(db: Path) -> list[Any]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM requests WHERE endpoint = 'responses' ORDER BY time").fetchall()


def test_the_openai_agents_sdk_drives_it(served: Served) -> None:
    """The Agents SDK's default model (Responses, streamed) against this server: a function tool the
    SDK runs, and an MCP tool the server runs once the SDK's approval callback says yes."""
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=f"{served.server.url}/v1", api_key=served.key, max_retries=0)
    model = OpenAIResponsesModel(model="tiny", openai_client=client)

    @function_tool
    def get_weather(city: Literal["Paris", "Lyon"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    settings = ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    weather = Agent(name="weather", model=model, tools=[get_weather], model_settings=settings)
    weather.tool_use_behavior = "stop_on_first_tool"

    config = {"type": "mcp", "server_label": "tools", "require_approval": "always", "allowed_tools": ["add"]}
    approved: list[str] = []

    def approve(request: Any) -> dict[str, bool]:
        approved.append(request.data.name)
        return {"approve": True}

    adder = Agent(
        name="adder",
        model=model,
        tools=[HostedMCPTool(tool_config=config, on_approval_request=approve)],  # type: ignore[arg-type]
        model_settings=settings,
    )

    async def run() -> list[Any]:  # one event loop for the client's whole life
        answer = await Runner.run(weather, "Weather in Paris?")
        assert answer.final_output in ("sunny in Paris", "sunny in Lyon")
        streamed = Runner.run_streamed(adder, "Add 2 and 3.", max_turns=3)
        items: list[Any] = []
        # a random model never stops by itself: it runs out of tokens or of turns
        with contextlib.suppress(ModelBehaviorError, MaxTurnsExceeded):
            async for event in streamed.stream_events():
                if event.type == "run_item_stream_event":
                    items.append(event.item.raw_item)
        return items

    raw = asyncio.run(run())
    assert approved and set(approved) == {"add"}
    calls = [i for i in raw if getattr(i, "type", None) == "mcp_call"]
    assert calls and calls[0].error is None and " = " in calls[0].output  # the server ran it, the SDK saw it


def ask(member: Member, text: str) -> Any:
    """Sends `text`; the answer it starts (not the last one before it)."""
    before = member.messages("assistant").count()
    member.send(text)
    return member.messages("assistant").nth(before)


def test_a_space_uses_the_mcp_servers_it_enables(served: Served, browser: Browser) -> None:
    """A member enables the configured MCP server in a Space (another member sees it live);
    `/tools_add` in a mention makes the model call that tool first, and every member sees the call
    — name, arguments, result, time — in the thread; each round is on the ledger; Stop cancels a
    hanging call on the MCP server; once disabled, the server's tools are offered no more."""
    url = served.server.url
    ana = Member(browser, url).sign_in(served.key)
    ben = Member(browser, url).sign_in(new_key(served.db, "lab", "ben"))
    space = new_space(ana, "Tools")
    ben.open(space)
    toggle = "[data-testid=mcp-toggle][data-label=tools]"
    expect(ana.page.locator("[data-testid=mcp-server][data-label=tools]")).to_contain_text("add, fail, hang")
    ana.page.locator(toggle).check()
    expect(ben.page.locator(toggle)).to_be_checked()  # live, through the Space's event stream

    composer = ana.page.locator("[data-testid=composer]")
    composer.press_sequentially("@tiny /tools_a")
    expect(ana.page.locator("[data-testid=mention-option]")).to_have_text(["/tools_addtools"])
    composer.press("Tab")
    assert composer.input_value() == "@tiny /tools_add "
    composer.press_sequentially("two and three")
    composer.press("Enter")
    answer = ben.messages("assistant").nth(0)
    expect(answer).to_have_attribute("data-status", "done", timeout=60_000)
    call = answer.locator("[data-testid=tool-call]").first
    expect(call).to_have_attribute("data-status", "completed")
    expect(call.locator("[data-testid=tool-call-name]")).to_have_text("tools · add")
    call.locator("summary").click()
    arguments = json.loads(call.locator("[data-testid=tool-call-arguments]").text_content() or "")
    a, b = arguments["a"], arguments["b"]
    expect(call.locator("[data-testid=tool-call-result]")).to_have_text(f"{a} + {b} = {a + b}")
    expect(call.locator("summary")).to_contain_text(re.compile(r"done · \d+\.\d\d s"))

    thread = api(url, f"/web/api/spaces/{space}", served.key)[1]["messages"]
    stored = thread[-1]
    assert stored["tool_calls"][0] | {"duration": 0} == stored["tool_calls"][0] | {
        "server_label": "tools",
        "name": "add",
        "output": f"{a} + {b} = {a + b}",
        "error": None,
        "status": "completed",
        "duration": 0,
    }
    with sqlite3.connect(served.db) as conn:
        rounds = conn.execute(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens), COUNT(*) FROM requests "
            "WHERE endpoint = 'space'"
        ).fetchone()
    assert rounds[2] >= 2  # the call's round, then at least one that read its result
    assert (stored["usage"]["prompt_tokens"], stored["usage"]["completion_tokens"]) == rounds[:2]
    status, markdown = api(url, f"/web/api/spaces/{space}/export.md", served.key)
    assert (
        status == 200
        and f"`tools.add({stored['tool_calls'][0]['arguments']})` — completed" in markdown.decode()
    )

    noted = ask(ana, "@tiny /remember that we ship on Friday")  # answered in the loop, then on
    expect(noted).to_have_attribute("data-status", "done", timeout=60_000)
    expect(noted.locator("[data-testid=message-meta]")).to_contain_text("used remember")
    notes = api(url, f"/web/api/spaces/{space}", served.key)[1]["notes"]  # the random model may
    assert notes and all(  # call remember again once it is free to
        n["status"] == "proposed" and n["author"] == "tiny" and 0 < len(n["text"]) <= 200 for n in notes
    )
    expect(ben.page.locator("[data-testid=note][data-status=proposed]")).to_have_count(len(notes))
    with sqlite3.connect(served.db) as conn:  # the note's round, then the answer reading "proposed…"
        assert (
            conn.execute("SELECT COUNT(*) FROM requests WHERE endpoint = 'space'").fetchone()[0]
            >= rounds[2] + 2
        )

    marker = served.home / "cancelled"
    marker.unlink(missing_ok=True)
    hanging = ask(ana, "@tiny /tools_hang please")
    expect(hanging.locator("[data-testid=tool-call]")).to_have_attribute("data-status", "in_progress")
    hanging.locator("[data-testid=stop]").click()
    expect(hanging).to_have_attribute("data-status", "stopped")
    expect(hanging.locator("[data-testid=tool-call]")).to_have_attribute("data-status", "failed")
    hanging.locator("[data-testid=tool-call] summary").click()
    expect(hanging.locator("[data-testid=tool-call-result]")).to_have_text("stopped before it finished")
    deadline = time.monotonic() + 3  # cancelled on the MCP server, well before the 4 s call timeout
    while not marker.exists():
        assert time.monotonic() < deadline, "the tool call was not cancelled"
        time.sleep(0.05)

    ben.page.locator(toggle).uncheck()
    expect(ana.page.locator(toggle)).not_to_be_checked()
    composer.fill("")
    composer.press_sequentially("@tiny /tools_a")
    expect(ana.page.locator("[data-testid=mention-popup]")).to_be_hidden()
    composer.press_sequentially("dd 4 and 5")
    before = ana.messages("assistant").count()
    composer.press("Enter")
    last = ana.messages("assistant").nth(before)
    expect(last).to_have_attribute("data-status", "done", timeout=60_000)
    expect(last.locator("[data-testid=tool-call]")).to_have_count(0)
    ana.close()
    ben.close()
