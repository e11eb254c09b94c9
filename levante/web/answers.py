"""The model as a member of a Space: what it sees when @-mentioned, and its answer streamed into
the thread.

It sees instructions (who it is, the Space, its memory), then the thread: members' messages as
"Name: text" user turns (consecutive ones merged, images attached), its own earlier answers as
assistant turns after the tool calls they made. The thread is cut to a stated token budget,
oldest messages dropped first, memory and the asking message always kept. The answer is a
response of the API's own Responses loop (`Responder`), so it is checked, refused, metered and
billed exactly as an API request is, and may call the tools of the MCP servers the Space enabled
— each call shown in the thread as it starts and ends. `/tool_name` in the asking message makes
the model call that tool first."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from levante.api.errors import APIError, bad_request
from levante.api.images import resolve_messages
from levante.api.responses_api import (
    FunctionTool,
    MCPTool,
    NamedFunction,
    Offered,
    ResponsesRequest,
    Run,
    to_messages,
    tool_specs,
)
from levante.api.server import Server, State
from levante.engine import RequestError
from levante.errors import TokenizerError
from levante.metering.ledger import Key
from levante.web.events import Hub
from levante.web.store import Store

log = logging.getLogger(__name__)

REMEMBER = FunctionTool(
    type="function",
    name="remember",
    description=(
        "Propose a note for this Space's shared memory: a lasting fact, decision or preference the "
        "team will want you to know in later conversations. A member confirms it before it is kept."
    ),
    parameters={
        "type": "object",
        "properties": {
            "note": {"type": "string", "maxLength": 200, "description": "the note, one or two sentences"}
        },
        "required": ["note"],
        "additionalProperties": False,
    },
)
FINISHED = ("completed", "failed")  # a tool call's states once it has its result (or error)


@dataclass(frozen=True)
class AnswerLimits:
    context_tokens: int = 8192  # the most prompt tokens a Space answer sees (memory + thread)
    max_tokens: int = 1024  # the longest answer (all of its tool rounds together)


@dataclass
class Pending:
    """An answer checked and ready to run: its response, the MCP tools it may call, who pays."""

    run: Run
    offered: dict[str, Offered]
    caller: Key | None


def mentions(content: str, model_name: str) -> bool:
    """Whether the text @-mentions the model: `@name` not glued to more name characters."""
    return re.search(rf"(?<![\w@])@{re.escape(model_name)}(?![\w.-])", content) is not None


def forced_tool(content: str, names: list[str]) -> str | None:
    """The first `/tool_name` in the text that names one of `names` (other slashes are just text)."""
    for found in re.finditer(r"(?<!\S)/([A-Za-z0-9_-]{1,64})(?![\w/.-])", content):
        if found[1] in names:
            return found[1]
    return None


def system_prompt(model: str, space: dict[str, Any], notes: list[dict[str, Any]], remember: bool) -> str:
    lines = [
        f"You are {model}, a member of the team Space “{space['title']}” (team {space['team']}). "
        "Several people write in this shared thread; each of their messages starts with the "
        "writer's name. Answer the person who mentioned you, in the thread's language.",
    ]
    if notes:
        lines.append("\nThe Space's memory (notes the team pinned; treat them as true):")
        lines += [f"- {n['text']}" for n in notes]
    if remember:
        lines.append("\nWhen the team tells you something worth keeping, propose it with the remember tool.")
    return "\n".join(lines)


def thread_items(messages: list[dict[str, Any]], images: dict[str, str] | None) -> list[dict[str, Any]]:
    """Responses input items from thread messages; `images` maps an image URL to its data URL
    (None: the model reads no images, so each is named in the text instead). An earlier answer
    comes as the MCP calls it made, with their results, then its text."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant":
            if m["status"] not in ("done", "stopped"):
                continue  # failed or still streaming: not something the model said
            items += [c for c in m["tool_calls"] if c.get("type") == "mcp_call" and c["status"] in FINISHED]
            if not m["content"]:
                continue
            role, parts = "assistant", [{"type": "output_text", "text": m["content"]}]
        else:
            text = f"{m['author']}: {m['content']}"
            if images is None and m["images"]:
                text += f" [{len(m['images'])} image(s)]"
            role, parts = "user", [{"type": "input_text", "text": text}]
            if images is not None:
                parts += [{"type": "input_image", "image_url": images[url]} for url in m["images"]]
        last = items[-1] if items else None
        if last is not None and last.get("type") == "message" and last["role"] == role:
            last["content"] += parts
        else:
            items.append({"type": "message", "role": role, "content": parts})
    return items


def image_count(messages: list[dict[str, Any]]) -> int:
    """Images the model reads from these messages: attached ones and those tools returned."""
    calls = (c for m in messages for c in m["tool_calls"] if c.get("type") == "mcp_call")
    return sum(len(m["images"]) for m in messages) + sum(len(c.get("images") or ()) for c in calls)


async def count_tokens(
    server: Server, state: State, instructions: str, items: list[dict[str, Any]], specs: list[dict[str, Any]]
) -> int:
    vision = state.engine.engine.model.config.vision is not None
    messages = [{"role": "system", "content": instructions}, *to_messages(items, vision)]
    resolved = await resolve_messages(messages, server.config.images)
    try:
        return len((await asyncio.to_thread(state.tokenizer.encode_chat, resolved, specs or None)).tokens)
    except TokenizerError as e:
        raise bad_request(str(e), "content") from None


@dataclass
class Answers:
    """Runs the model's answers in the Spaces: one asyncio task per streaming answer."""

    server: Server
    store: Store
    hub: Hub
    limits: AnswerLimits
    credits: Callable[[str], dict[str, Any]]  # a Space's credits panel, sent once an answer is billed

    def __post_init__(self) -> None:
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.busy: set[int] = set()  # answers being (re)started or streaming: one run each at a time
        self.partial: dict[int, list[str]] = {}  # the text so far of each streaming answer
        self.calls: dict[int, list[dict[str, Any]]] = {}  # the tool calls so far of each

    def offers_tools(self, state: State) -> bool:
        """Tools (`remember`, the Space's MCP servers) exist only where the model has a tool-call
        format."""
        return state.tokenizer.tool_call_tokens is not None

    def mcp_servers(self) -> list[dict[str, Any]]:
        """The operator's MCP servers a Space may enable: their state and tools."""
        mcp = self.server.mcp
        if mcp is None:
            return []
        status = mcp.status()
        return [
            {
                "label": label,
                "state": status[label]["state"],
                "error": status[label]["error"],
                "tools": [{"name": t.name, "description": t.description} for t in mcp.tools(label)],
            }
            for label in mcp.names()
        ]

    def claim(self, answer_id: int) -> None:
        if answer_id in self.busy:
            raise APIError(409, "this answer is still streaming; stop it first", code="answer_streaming")
        self.busy.add(answer_id)

    def live(self, message: dict[str, Any]) -> dict[str, Any]:
        """The message as a page should see it now: a streaming answer with its text and tool
        calls so far."""
        if message["status"] != "streaming" or message["id"] not in self.partial:
            return message
        text, calls = self.partial[message["id"]], self.calls[message["id"]]
        return {**message, "content": "".join(text), "tool_calls": [dict(c) for c in calls]}

    async def prompt(
        self,
        state: State,
        instructions: str,
        thread: list[dict[str, Any]],
        specs: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """The input items for an answer to the last of `thread`, cut to the token budget and to
        the images a request may carry, oldest messages dropped first."""
        vision = state.engine.engine.model.config.vision is not None
        images = (
            {
                url: url if url.startswith("data:") else self.store.data_url(url.rsplit("/", 1)[1])
                for m in thread
                for url in m["images"]
            }
            if vision
            else None
        )  # a message not stored yet (the one asking) carries its images as data URLs
        budget = min(self.limits.context_tokens, state.max_model_len - self.limits.max_tokens)
        most_images = self.server.config.images.max_images

        async def fits(drop: int) -> bool:
            if vision and image_count(thread[drop:]) > most_images:
                return False
            items = thread_items(thread[drop:], images)
            return await count_tokens(self.server, state, instructions, items, specs) <= budget

        if await fits(0):
            return thread_items(thread, images)
        low, high = 1, len(thread) - 1  # the fewest drops that fit lie in [low, high], if any does
        if not await fits(high):
            tools = ", the tools' descriptions" if specs else ""
            raise bad_request(
                f"the message, the Space's memory{tools} need more than the {budget} tokens (or "
                f"{most_images} images) a Space answer may read; shorten the message or the memory",
                "content",
                "context_length_exceeded",
            )
        while low < high:
            mid = (low + high) // 2
            if await fits(mid):
                high = mid
            else:
                low = mid + 1
        return thread_items(thread[low:], images)

    async def start(
        self, state: State, caller: Key | None, space: dict[str, Any], thread: list[dict[str, Any]]
    ) -> Pending:
        """Checks and prepares the model's answer to the last message of `thread`; raises the
        API's error (429 when the team pool is spent, 400 for what the request cannot hold) before
        anything is stored. A key answering in another team's Space (an admin's) draws on that
        team's pool."""
        if caller is not None and caller.id is not None and caller.team != space["team"]:
            caller = replace(caller, team=space["team"])
        self.server.check_budget(caller)
        tools: list[FunctionTool | MCPTool] = []
        if self.offers_tools(state):
            enabled = [
                label for label in space["mcp"] if self.server.mcp and label in self.server.mcp.names()
            ]
            tools = [
                REMEMBER,
                *(MCPTool(type="mcp", server_label=label, require_approval="never") for label in enabled),
            ]
        longest = min(self.limits.max_tokens, state.defaults.get("max_tokens") or self.limits.max_tokens)
        instructions = system_prompt(
            state.model_name, space, self.store.notes(space["id"], "pinned"), bool(tools)
        )
        request = ResponsesRequest(
            input="-", instructions=instructions, tools=tools, max_output_tokens=longest, store=False
        )
        offered = self.server.responder.offered(request)
        items = await self.prompt(state, instructions, thread, tool_specs(request, offered))
        first = forced_tool(thread[-1]["content"], [*offered, *(["remember"] if tools else [])])
        choice = NamedFunction(type="function", name=first) if first else "auto"
        # `/tool` asks for one call of it: the answer's rounds then make one call each
        update = {"input": items, "tool_choice": choice, "parallel_tool_calls": first is None}
        run, offered = self.server.responder.begin(request.model_copy(update=update), None)
        run.endpoint, run.forced_rounds = "space", 1
        if tools:
            run.local["remember"] = lambda arguments: self.propose(state, space["id"], arguments)
        return Pending(run, offered, caller)

    def run(self, state: State, pending: Pending, answer: dict[str, Any], asker: str) -> None:
        """Streams the answer into its row and to every open page, in the background."""
        mid = answer["id"]
        self.busy.add(mid)
        self.partial[mid], self.calls[mid] = [], []
        task = asyncio.ensure_future(self._stream(state, pending, answer, asker))
        self.tasks[mid] = task

        def done(_: asyncio.Task[None]) -> None:
            self.tasks.pop(mid, None)
            self.partial.pop(mid, None)
            self.calls.pop(mid, None)
            self.busy.discard(mid)

        task.add_done_callback(done)

    async def _stream(self, state: State, pending: Pending, answer: dict[str, Any], asker: str) -> None:
        space, mid, run = answer["space"], answer["id"], pending.run
        text, calls, length = self.partial[mid], self.calls[mid], 0  # length: of the text, in characters
        proposals: list[dict[str, Any]] = []
        status, error = "done", None
        started = time.monotonic()
        events = self.server.responder.events(state, pending.caller, run, pending.offered)

        def say(delta: str) -> None:  # the offset lets a page that missed a delta notice it
            nonlocal length
            self.hub.publish(space, "delta", {"id": mid, "offset": length, "text": delta})
            text.append(delta)
            length += len(delta.encode("utf-16-le")) // 2  # as the page counts: UTF-16 code units

        try:
            async for event in events:
                kind, item = event["type"], event.get("item") or {}
                if kind == "response.output_item.added" and item["type"] == "message" and length:
                    say("\n\n")  # a later round's text: its own paragraph
                elif kind == "response.output_text.delta":
                    say(event["delta"])
                elif kind.startswith("response.output_item.") and item["type"] == "mcp_call":
                    if item not in calls:
                        calls.append(item)
                    self.hub.publish(space, "call", {"id": mid, "call": item})
                elif kind == "response.output_item.done" and item["type"] == "function_call":
                    proposals.append(item)  # `remember`, already proposed: shown under the answer
                elif kind in ("response.failed", "response.incomplete"):
                    body = event["response"]
                    reason = (body["incomplete_details"] or {}).get("reason")
                    if body["error"] is not None:
                        status, error = "error", body["error"]["message"]
                    elif reason == "max_tool_rounds":
                        error = f"stopped after {self.server.responder.max_rounds} rounds of tool calls"
        except asyncio.CancelledError:
            status = "stopped"
        except (APIError, RequestError) as e:
            status, error = "error", e.message if isinstance(e, APIError) else str(e)
        except Exception as e:  # a bug must not leave the answer streaming forever
            log.exception("answer %d failed", mid)
            status, error = "error", f"internal error: {type(e).__name__}"
        finally:
            await events.aclose()  # ends a round's engine request and any tool call still running
        for call in calls:
            if call["status"] not in FINISHED:
                call.update(status="failed", error="stopped before it finished")
        u = run.usage
        cost = self.server.config.prices.cost(u["input"], u["cached"], u["output"])
        usage = {"prompt_tokens": u["input"], "completion_tokens": u["output"], "cost": cost}
        latency = time.monotonic() - started
        try:  # the answer's row is settled first: a failing write below cannot leave it streaming
            self.store.update_answer(
                mid,
                content="".join(text),
                status=status,
                error=error,
                usage=usage,
                tool_calls=[*calls, *proposals],
            )
        finally:
            self.hub.notify(space)
        self.store.charge(run.id, space, mid, asker, {**usage, "latency": latency})
        self.hub.publish(space, "credits", self.credits(space))

    def propose(self, state: State, space: str, arguments: str) -> str:
        """A `remember` call becomes a proposed note that a member confirms or dismisses; returns
        what the model reads back."""
        try:
            note = json.loads(arguments).get("note", "").strip()
        except (json.JSONDecodeError, AttributeError):
            note = ""
        if not note:
            return "error: give the note to remember in `note`"
        self.store.add_note(space, note, state.model_name, "proposed")
        self.hub.notify(space)
        return "Proposed for the Space's memory; a member will confirm or dismiss it."
