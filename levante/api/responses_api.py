"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) with tools the server runs.

A response is a loop of chat requests through the API's own path (`Server.start_chat`: the same
budget check, grammar-constrained tool calls, ledger row per round under the caller's key):
generate → run the calls the model made to the operator's MCP servers (concurrently, each with a
timeout, results truncated to a stated size) → feed the results back → generate again, at most
`max_tool_rounds` times. Calls to the client's own `function` tools end the response with
`function_call` items, as in Chat Completions; MCP calls whose tool needs approval end it with
`mcp_approval_request` items, answered by `mcp_approval_response` inputs on the next request.
Every response is stored (SQLite) so `previous_response_id` continues the conversation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from levante.api import protocol
from levante.api.errors import APIError, bad_request
from levante.api.protocol import Strict
from levante.api.responses import chat_chunks
from levante.errors import LevanteError
from levante.mcp import MCPServers, ToolCallFailed

if TYPE_CHECKING:
    from levante.api.server import ChatRun, Server, State
    from levante.metering.ledger import Key

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_-]")
log = logging.getLogger(__name__)
RESULT_CHARS = 16_000  # a tool result longer than this reaches the model truncated (and says so)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---- the request -------------------------------------------------------------------------------


class ToolNames(Strict):
    tool_names: list[str] = Field(default_factory=list)


class ApprovalFilter(Strict):
    always: ToolNames | None = None
    never: ToolNames | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class MCPTool(Strict):
    type: Literal["mcp"]
    server_label: str
    server_url: str | None = None  # refused: servers are the operator's (--mcp-config), never dialled
    allowed_tools: list[str] | ToolNames | None = None
    require_approval: Literal["always", "never"] | ApprovalFilter = "always"
    headers: dict[str, str] | None = None  # refused with server_url
    server_description: str | None = None


class TextFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class ResponsesRequest(Strict):
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool | MCPTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None  # accepted: nothing optional is left out of what we return


# ---- input items → chat messages ---------------------------------------------------------------


def _content(parts: str | list[dict[str, Any]], where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content parts (input_text/output_text → text, input_image →
    image_url)."""
    if isinstance(parts, str):
        return parts
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            out.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise bad_request(f"{where}.content[{j}]: unsupported content part {kind!r}", f"{where}.content")
    return out


def _result_text(content: list[dict[str, Any]]) -> str:
    text = "\n".join(
        c["text"] if c["type"] == "text" else f"[image {c.get('mime_type', '')}]" for c in content
    )
    if len(text) > RESULT_CHARS:
        text = text[:RESULT_CHARS] + f"\n[truncated: {len(text) - RESULT_CHARS} more characters]"
    return text


def _need(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key}: expected a string", f"{where}.{key}")
    return value


def to_messages(items: list[dict[str, Any]], vision: bool = False) -> list[dict[str, Any]]:
    """Conversation items (inputs and earlier outputs) as chat messages: function and MCP calls
    become assistant tool calls followed by their results as tool messages; images an MCP tool
    returned follow as a user message a vision model sees (tool messages carry text only)."""
    messages: list[dict[str, Any]] = []

    def call(call_id: str, name: str, arguments: str) -> None:
        entry = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(entry)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [entry]})

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(
                    f"{where}.role: expected user, system, developer or assistant", f"{where}.role"
                )
            if not isinstance(item.get("content"), str | list):
                raise bad_request(
                    f"{where}.content: a message needs text or content parts", f"{where}.content"
                )
            messages.append({"role": role, "content": _content(item["content"], where)})
        elif kind == "function_call":
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise bad_request(f"{where}.arguments: expected a JSON string", f"{where}.arguments")
            call(_need(item, "call_id", where), _need(item, "name", where), arguments)
        elif kind == "function_call_output":
            output = item.get("output")
            text = (
                output if isinstance(output, str) else json.dumps(output)
            )  # a JSON result, as OpenAI allows
            messages.append({"role": "tool", "tool_call_id": _need(item, "call_id", where), "content": text})
        elif kind == "mcp_call":  # as this server returned it, or as a client echoes OpenAI's item back
            call_id = item["call_id"] if isinstance(item.get("call_id"), str) else _need(item, "id", where)
            name = item.get("model_name")
            if not isinstance(name, str):
                name = _NOT_NAME.sub(
                    "_", f"{_need(item, 'server_label', where)}_{_need(item, 'name', where)}"
                )
            call(call_id, name[:64], _need(item, "arguments", where))
            result = item.get("output") if item.get("error") is None else f"error: {item['error']}"
            text = result if isinstance(result, str) else json.dumps(result) if result is not None else ""
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if (
                vision
                and isinstance(item.get("images"), list)
                and all(isinstance(u, str) for u in item["images"])
            ):
                parts = [{"type": "image_url", "image_url": {"url": url}} for url in item["images"]]
                messages.append(
                    {"role": "user", "content": [{"type": "text", "text": f"Images from {name}:"}, *parts]}
                )
        elif kind not in ("mcp_list_tools", "mcp_approval_request", "mcp_approval_response"):
            raise bad_request(f"{where}.type: unsupported input item {kind!r}", f"{where}.type")
    return messages


# ---- the loop ----------------------------------------------------------------------------------


@dataclass
class Offered:
    """An MCP tool as the model sees it (`<label>_<tool>`) and where it runs."""

    label: str
    tool: str
    approval: bool
    spec: dict[str, Any]


@dataclass
class Run:
    """One response: its items, usage and events."""

    id: str
    request: ResponsesRequest
    history: list[dict[str, Any]]  # earlier conversation items (from previous_response_id)
    inputs: list[dict[str, Any]]
    endpoint: str = "responses"  # the ledger's name for where the rounds came from
    forced_rounds: int | None = None  # rounds a named/required tool_choice binds (None: all), then auto
    # functions the server answers itself (a Space's `remember`): arguments → what the model reads;
    # their calls are answered in the loop, not handed back
    local: dict[str, Callable[[str], str]] = field(default_factory=dict)
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"input": 0, "cached": 0, "output": 0})
    sequence: int = 0
    created: float = field(default_factory=time.time)

    def event(self, kind: str, **body: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **body}

    def body(
        self, model: str, status: str, error: dict[str, Any] | None = None, reason: str | None = None
    ) -> dict:
        req = self.request
        fmt = (
            req.text.format.model_dump(by_alias=True, exclude_none=True)
            if req.text and req.text.format
            else None
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": int(self.created),
            "status": status,
            "model": model,
            "output": self.output,
            "instructions": req.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools],
            "tool_choice": req.tool_choice
            if isinstance(req.tool_choice, str)
            else req.tool_choice.model_dump(),
            "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "text": {"format": fmt or {"type": "text"}},
            "metadata": req.metadata or {},
            "error": error,
            "incomplete_details": {"reason": reason} if reason else None,
            "usage": {
                "input_tokens": self.usage["input"],
                "input_tokens_details": {"cached_tokens": self.usage["cached"]},
                "output_tokens": self.usage["output"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["input"] + self.usage["output"],
            },
        }


class ResponseStore:
    """Stored responses (SQLite, WAL): the response body and the conversation items that led to it,
    so a later request can continue from it."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                "team TEXT, body TEXT NOT NULL, items TEXT NOT NULL)"
            )
        except (OSError, sqlite3.Error) as e:
            raise LevanteError(f"{path}: cannot open the responses store ({e})") from None
        self.lock = threading.Lock()

    def put(self, body: dict[str, Any], items: list[dict[str, Any]], team: str | None) -> None:
        with self.lock:
            self.db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (body["id"], time.time(), team, json.dumps(body), json.dumps(items)),
            )

    def get(self, response_id: str, team: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A stored response visible to `team` (None: every team's, for admins and keyless servers)."""
        row = self.db.execute(
            "SELECT team, body, items FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None or (team is not None and row[0] != team):
            return None
        return json.loads(row[1]), json.loads(row[2])


def _format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None:
        raise bad_request("text.format: a json_schema format needs its schema", "text.format.schema")
    schema = {"name": fmt.name or "answer", "schema": fmt.json_schema, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": schema}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _approval(tool: MCPTool, name: str) -> bool:
    rule = tool.require_approval
    if isinstance(rule, str):
        return rule == "always"
    if rule.never is not None and name in rule.never.tool_names:
        return False
    return rule.always is None or not rule.always.tool_names or name in rule.always.tool_names


def tool_specs(req: ResponsesRequest, offered: dict[str, Offered]) -> list[dict[str, Any]]:
    """The chat tools every round offers: the client's functions, then the MCP tools."""
    functions = [
        t.model_dump(exclude_none=True, exclude={"type"}) for t in req.tools if isinstance(t, FunctionTool)
    ]
    return [{"type": "function", "function": f} for f in [*functions, *(o.spec for o in offered.values())]]


class Responder:
    """Runs responses for one server: the MCP servers it may call, where responses are stored and
    how many rounds a response may take."""

    def __init__(self, server: Server, mcp: MCPServers | None, store: ResponseStore, max_rounds: int) -> None:
        self.server, self.mcp, self.store, self.max_rounds = server, mcp, store, max_rounds

    def offered(self, req: ResponsesRequest) -> dict[str, Offered]:
        """The MCP tools this request lets the model call, by the name the model sees."""
        out: dict[str, Offered] = {}
        functions = {t.name for t in req.tools if isinstance(t, FunctionTool)}
        for i, tool in enumerate(req.tools):
            if not isinstance(tool, MCPTool):
                continue
            where = f"tools[{i}]"
            if tool.server_url is not None or tool.headers is not None:
                raise bad_request(
                    f"{where}.server_url: this server calls only the MCP servers its operator configured "
                    "(levante serve --mcp-config); name one by server_label",
                    f"{where}.server_url",
                )
            labels = self.mcp.names() if self.mcp is not None else []
            if tool.server_label not in labels:
                known = ", ".join(labels) or "none (start the server with --mcp-config)"
                raise bad_request(
                    f"{where}.server_label: no MCP server {tool.server_label!r}; configured: {known}",
                    f"{where}.server_label",
                )
            allowed = tool.allowed_tools
            names = allowed.tool_names if isinstance(allowed, ToolNames) else allowed
            assert self.mcp is not None
            for spec in self.mcp.tools(tool.server_label):
                if names is not None and spec.name not in names:
                    continue
                seen = _NOT_NAME.sub("_", f"{tool.server_label}_{spec.name}")[:64]  # MCP allows . and /
                if seen in functions or seen in out:
                    raise bad_request(f"{where}: the tool name {seen!r} is offered twice", where)
                # arguments the tool did not declare cannot help it: the grammar leaves them out
                parameters = {"additionalProperties": False, **spec.input_schema}
                function = {"name": seen, "description": spec.description, "parameters": parameters}
                out[seen] = Offered(tool.server_label, spec.name, _approval(tool, spec.name), function)
        return out

    def begin(self, req: ResponsesRequest, team: str | None) -> tuple[Run, dict[str, Offered]]:
        """The response's run with its history, checked before anything is generated."""
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            found = self.store.get(req.previous_response_id, team)
            if found is None:
                raise APIError(
                    404,
                    f"Previous response with id '{req.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = found[1]
        inputs = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else list(req.input)
        offered = self.offered(req)
        to_messages(history + inputs)  # every item readable, before anything runs
        return Run(new_id("resp"), req, history, inputs), offered

    async def events(
        self, state: State, caller: Key | None, run: Run, offered: dict[str, Offered]
    ) -> AsyncIterator[dict[str, Any]]:
        """The response as Responses API stream events, the last one carrying the whole response."""
        req, model = run.request, state.model_name
        yield run.event("response.created", response=run.body(model, "in_progress"))
        yield run.event("response.in_progress", response=run.body(model, "in_progress"))
        for label in sorted({o.label for o in offered.values()}):
            tools = [
                {"name": o.tool, "description": o.spec["description"], "input_schema": o.spec["parameters"]}
                for o in offered.values()
                if o.label == label
            ]
            item = {"type": "mcp_list_tools", "id": new_id("mcpl"), "server_label": label, "tools": tools}
            for event in self._item(run, item, "mcp_list_tools", ("in_progress", "completed")):
                yield event
        for item in await self._approved(run, offered):
            outcome = "failed" if item["error"] else "completed"
            for event in self._item(run, item, "mcp_call", ("in_progress", outcome)):
                yield event
        vision = state.engine.engine.model.config.vision is not None
        tools = tool_specs(req, offered)
        for round_number in range(self.max_rounds):
            left = req.max_output_tokens - run.usage["output"] if req.max_output_tokens is not None else None
            if left is not None and left <= 0:  # max_output_tokens bounds the whole response, every round
                yield self._end(run, caller, model, "incomplete", reason="max_output_tokens")
                return
            messages = to_messages(run.history + run.inputs + run.output, vision)
            if req.instructions:
                messages = [{"role": "system", "content": req.instructions}, *messages]
            try:
                forced = run.forced_rounds is None or round_number < run.forced_rounds
                choice = req.tool_choice if forced else "auto"
                chat = await self.server.start_chat(
                    state, caller, self._chat(req, messages, tools, choice, left), run.endpoint
                )
            except APIError as e:
                if round_number == 0:
                    raise  # nothing was generated yet: the request itself is refused
                yield self._end(
                    run, caller, model, "failed", error={"code": e.code or "error", "message": e.message}
                )
                return
            calls: dict[int, dict[str, str]] = {}
            async for event in self._generate(run, state, chat, calls):
                yield event
            cut = chat.tracker.reasons == ["length"]  # the output ran out: the last call may be unfinished
            async for event in self._dispatch(run, calls, offered, cut):
                yield event
            handed_back = any(  # calls the client answers: its own functions, approvals
                c["name"] not in run.local and (offered.get(c["name"]) is None or offered[c["name"]].approval)
                for c in calls.values()
            )
            if not calls or handed_back or cut:  # an answer, the client's turn, or out of tokens
                reason = "max_output_tokens" if cut else None
                yield self._end(run, caller, model, "incomplete" if cut else "completed", reason=reason)
                return
        yield self._end(run, caller, model, "incomplete", reason="max_tool_rounds")

    @staticmethod
    def _chat(
        req: ResponsesRequest,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        choice: str | NamedFunction,
        max_tokens: int | None,
    ) -> protocol.ChatRequest:
        """One round's chat request."""
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
        body.update(temperature=req.temperature, top_p=req.top_p, response_format=_format(req))
        if tools:
            named = {"type": "function", "function": {"name": getattr(choice, "name", "")}}
            body.update(tools=tools, parallel_tool_calls=req.parallel_tool_calls)
            body["tool_choice"] = choice if isinstance(choice, str) else named
        try:
            return protocol.ChatRequest.model_validate(body)
        except ValidationError as e:  # what the input items carried that a chat message cannot hold
            raise bad_request(
                f"input: the conversation is not one this model can read ({e.errors()[0]['msg']})", "input"
            ) from None

    async def _generate(
        self, run: Run, state: State, chat: ChatRun, calls: dict[int, dict[str, str]]
    ) -> AsyncIterator[dict[str, Any]]:
        """One round's generation: its text as a message item streamed delta by delta, its tool
        calls gathered into `calls` (by index) and its tokens into the response's usage."""
        message: dict[str, Any] = {
            "type": "message",
            "id": new_id("msg"),
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        where = {"item_id": message["id"], "output_index": len(run.output), "content_index": 0}
        text: list[str] = []
        chunks = chat_chunks(chat.head, chat.outputs, 1, state.tokenizer, False, chat.plan.tool_names)
        try:
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    if delta.get("content"):
                        if not text:
                            run.output.append(message)
                            yield run.event(
                                "response.output_item.added", output_index=where["output_index"], item=message
                            )
                            part = {"type": "output_text", "text": "", "annotations": []}
                            yield run.event("response.content_part.added", **where, part=part)
                        text.append(delta["content"])
                        yield run.event(
                            "response.output_text.delta", **where, delta=delta["content"], logprobs=[]
                        )
                    for call in delta.get("tool_calls") or ():
                        entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                        function = call.get("function") or {}
                        entry["id"] = call.get("id") or entry["id"]
                        entry["name"] = function.get("name") or entry["name"]
                        entry["arguments"] += function.get("arguments") or ""
        finally:
            await chunks.aclose()
            await chat.outputs.aclose()  # type: ignore[attr-defined]  # the engine request and its ledger row end here
            t = chat.tracker  # counted even when the response is cancelled here
            run.usage["input"] += t.prompt_tokens
            run.usage["cached"] += t.cached_tokens
            run.usage["output"] += t.tokens
        if text:
            part = {"type": "output_text", "text": "".join(text), "annotations": []}
            message.update(status="completed", content=[part])
            yield run.event("response.output_text.done", **where, text=part["text"], logprobs=[])
            yield run.event("response.content_part.done", **where, part=part)
            yield run.event("response.output_item.done", output_index=where["output_index"], item=message)

    async def _dispatch(
        self, run: Run, calls: dict[int, dict[str, str]], offered: dict[str, Offered], cut: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """A round's calls as output items: the client's functions and the MCP calls that need its
        approval handed back; the other MCP calls run together (a call cut off at the token limit
        is reported, not run)."""
        running: list[tuple[dict[str, Any], Offered]] = []
        for call in calls.values():
            mcp = offered.get(call["name"])
            if mcp is None:
                item = {
                    "type": "function_call",
                    "id": new_id("fc"),
                    "call_id": call["id"],
                    "name": call["name"],
                }
                item.update(arguments=call["arguments"], status="completed")
                if call["name"] in run.local:  # answered here; the model reads the answer next round
                    for event in self._item(run, item, None, ()):
                        yield event
                    output = run.local[call["name"]](call["arguments"])
                    item = {"type": "function_call_output", "id": new_id("fco"), "call_id": call["id"]}
                    item["output"] = output
            elif mcp.approval:
                item = {"type": "mcp_approval_request", "id": new_id("mcpr"), "server_label": mcp.label}
                item.update(name=mcp.tool, arguments=call["arguments"], call_id=call["id"])
            else:
                running.append((self._mcp_item(call["id"], mcp, call["arguments"]), mcp))
                continue
            for event in self._item(run, item, None, ()):
                yield event
        if cut and running and not _is_json(running[-1][0]["arguments"]):
            running[-1][0].update(error="the call was cut off at max_output_tokens", status="failed")
        for item, _ in running:
            run.output.append(item)
            index = len(run.output) - 1
            yield run.event("response.output_item.added", output_index=index, item=item)
            yield run.event("response.mcp_call.in_progress", output_index=index, item_id=item["id"])
        await asyncio.gather(*(self._call(item, mcp) for item, mcp in running if not item["error"]))
        for item, _ in running:
            index = run.output.index(item)
            outcome = "failed" if item["error"] else "completed"
            yield run.event(f"response.mcp_call.{outcome}", output_index=index, item_id=item["id"])
            yield run.event("response.output_item.done", output_index=index, item=item)

    def _end(
        self,
        run: Run,
        caller: Key | None,
        model: str,
        status: str,
        reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response's last event; the response is stored (unless `store` is false)."""
        body = run.body(model, status, error=error, reason=reason)
        if run.request.store:
            team = caller.team if caller is not None and not caller.admin else None
            self.store.put(body, run.history + run.inputs + run.output, team)
        return run.event(f"response.{status}", response=body)

    def _item(
        self, run: Run, item: dict[str, Any], kind: str | None, phases: tuple[str, ...]
    ) -> list[dict[str, Any]]:
        """An output item's events: added, its own phases (e.g. mcp_list_tools in_progress,
        completed), done."""
        run.output.append(item)
        index = len(run.output) - 1
        events = [run.event("response.output_item.added", output_index=index, item=item)]
        events += [run.event(f"response.{kind}.{p}", output_index=index, item_id=item["id"]) for p in phases]
        events.append(run.event("response.output_item.done", output_index=index, item=item))
        return events

    @staticmethod
    def _mcp_item(call_id: str, mcp: Offered, arguments: str) -> dict[str, Any]:
        return {
            "type": "mcp_call",
            "id": new_id("mcp"),
            "call_id": call_id,
            "model_name": mcp.spec["name"],
            "server_label": mcp.label,
            "name": mcp.tool,
            "arguments": arguments,
            "output": None,
            "error": None,
            "status": "in_progress",
        }

    async def _call(self, item: dict[str, Any], mcp: Offered) -> None:
        """Runs one MCP call into its item: output, or the error the model and client are told."""
        assert self.mcp is not None
        started = time.monotonic()
        try:
            arguments = json.loads(item["arguments"] or "{}")
            if not isinstance(arguments, dict):
                raise ToolCallFailed("the arguments are not a JSON object")
            result = await self.mcp.call(mcp.label, mcp.tool, arguments)
        except json.JSONDecodeError as e:
            item.update(error=f"the arguments are not JSON: {e}", status="failed")
        except ToolCallFailed as e:
            item.update(error=str(e), status="failed")
        except Exception as e:  # a bug must fail this call, not leave the others running unwatched
            log.exception("MCP call %s on %s failed", mcp.tool, mcp.label)
            item.update(error=f"internal error: {type(e).__name__}", status="failed")
        else:
            text = _result_text(result.content)
            if result.is_error:
                item.update(error=text or "the tool failed", status="failed")
            else:
                item.update(output=text, status="completed")
                images = [
                    f"data:{c['mime_type']};base64,{c['data']}"
                    for c in result.content
                    if c["type"] == "image"
                ]
                if images:  # kept with the call (stored too), for the rounds and responses after it
                    item["images"] = images
        item["duration"] = round(time.monotonic() - started, 3)

    async def _approved(self, run: Run, offered: dict[str, Offered]) -> list[dict[str, Any]]:
        """The calls this request's `mcp_approval_response` inputs answer, each checked first (a
        bad or repeated answer is a 400 before any tool runs), then the approved ones run together
        and the declined ones are reported to the model as declined."""
        earlier = run.history + run.inputs  # stored, or sent back by a client that keeps its own items
        requests = {i.get("id"): i for i in earlier if i.get("type") == "mcp_approval_request"}
        answered = {i.get("approval_request_id") for i in run.history if i.get("type") == "mcp_call"}
        chosen: list[tuple[dict[str, Any], Offered, bool]] = []
        for i, item in enumerate(run.inputs):
            if item.get("type") != "mcp_approval_response":
                continue
            where = f"input[{i}]"
            request_id = _need(item, "approval_request_id", where)
            if not isinstance(item.get("approve"), bool):
                raise bad_request(f"{where}.approve: expected true or false", f"{where}.approve")
            asked = requests.get(request_id)
            if asked is None or request_id in answered:
                why = "was already answered" if asked is not None else "is not in the conversation"
                raise bad_request(
                    f"{where}.approval_request_id: {request_id!r} {why}", f"{where}.approval_request_id"
                )
            answered.add(request_id)
            label, name = _need(asked, "server_label", where), _need(asked, "name", where)
            mcp = next((o for o in offered.values() if o.label == label and o.tool == name), None)
            if mcp is None:
                raise bad_request(
                    f"{where}: the tool {name!r} of {label!r} is not offered in this request", where
                )
            call = self._mcp_item(asked.get("call_id") or request_id, mcp, _need(asked, "arguments", where))
            call["approval_request_id"] = request_id
            chosen.append((call, mcp, item["approve"]))
        for call, _, approve in chosen:
            if not approve:
                call.update(error="the user declined this call", status="failed")
        await asyncio.gather(*(self._call(call, mcp) for call, mcp, approve in chosen if approve))
        return [call for call, _, _ in chosen]
