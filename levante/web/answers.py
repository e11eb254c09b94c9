"""The model as a member of a Space: what it sees when @-mentioned, and its answer streamed into
the thread.

It sees a system message (who it is, the Space, its memory), then the thread as chat turns:
members' messages as "Name: text" user turns (consecutive ones merged, images attached), its own
earlier answers as assistant turns. The thread is cut to a stated token budget, oldest messages
dropped first, memory and the asking message always kept. The answer goes through the API's own
chat path (`Server.start_chat`), so it is checked, refused, metered and billed exactly as an API
request is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from levante.api import protocol
from levante.api.errors import APIError, bad_request
from levante.api.images import resolve_messages
from levante.api.responses import chat_chunks
from levante.api.server import ChatRun, Server, State
from levante.engine import RequestError
from levante.errors import TokenizerError
from levante.metering.ledger import Key
from levante.web.events import Hub
from levante.web.store import Store

log = logging.getLogger(__name__)

REMEMBER = {
    "type": "function",
    "function": {
        "name": "remember",
        "description": (
            "Propose a note for this Space's shared memory: a lasting fact, decision or preference the "
            "team will want you to know in later conversations. A member confirms it before it is kept."
        ),
        "parameters": {
            "type": "object",
            "properties": {"note": {"type": "string", "description": "the note, one or two sentences"}},
            "required": ["note"],
        },
    },
}


@dataclass(frozen=True)
class AnswerLimits:
    context_tokens: int = 8192  # the most prompt tokens a Space answer sees (memory + thread)
    max_tokens: int = 1024  # the longest answer


def mentions(content: str, model_name: str) -> bool:
    """Whether the text @-mentions the model: `@name` not glued to more name characters."""
    return re.search(rf"(?<![\w@])@{re.escape(model_name)}(?![\w.-])", content) is not None


def system_prompt(model: str, space: dict[str, Any], notes: list[dict[str, Any]], tools: bool) -> str:
    lines = [
        f"You are {model}, a member of the team Space “{space['title']}” (team {space['team']}). "
        "Several people write in this shared thread; each of their messages starts with the "
        "writer's name. Answer the person who mentioned you, in the thread's language.",
    ]
    if notes:
        lines.append("\nThe Space's memory (notes the team pinned; treat them as true):")
        lines += [f"- {n['text']}" for n in notes]
    if tools:
        lines.append("\nWhen the team tells you something worth keeping, propose it with the remember tool.")
    return "\n".join(lines)


def thread_turns(messages: list[dict[str, Any]], images: dict[str, str] | None) -> list[dict[str, Any]]:
    """Chat turns from thread messages; `images` maps an image URL to its data URL (None: the model
    reads no images, so each is named in the text instead)."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m["status"] not in ("done", "stopped"):
            continue  # failed or still streaming: not something the model said
        role = "assistant" if m["role"] == "assistant" else "user"
        text = m["content"] if role == "assistant" else f"{m['author']}: {m['content']}"
        if images is None and m["images"]:
            text += f" [{len(m['images'])} image(s)]"
        parts = [{"type": "text", "text": text}]
        if images is not None:
            parts += [{"type": "image_url", "image_url": {"url": images[url]}} for url in m["images"]]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += parts
        else:
            turns.append({"role": role, "content": parts})
    return turns


async def count_tokens(server: Server, state: State, messages: list[dict[str, Any]], tools: bool) -> int:
    resolved = await resolve_messages(messages, server.config.images)
    specs = [REMEMBER] if tools else None
    try:
        return len((await asyncio.to_thread(state.tokenizer.encode_chat, resolved, specs)).tokens)
    except TokenizerError as e:
        raise bad_request(str(e), "content") from None


async def discard(run: ChatRun) -> None:
    """Ends a queued run nobody will read (what would have stored it failed): the engine frees it
    and its ledger row is written, which only happens once its outputs have started."""
    with contextlib.suppress(Exception):
        async for _ in run.outputs:
            break
    await run.outputs.aclose()  # type: ignore[attr-defined]


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

    def offers_tools(self, state: State) -> bool:
        """The `remember` tool exists only where the model has a tool-call format."""
        return state.tokenizer.tool_call_tokens is not None

    def claim(self, answer_id: int) -> None:
        if answer_id in self.busy:
            raise APIError(409, "this answer is still streaming; stop it first", code="answer_streaming")
        self.busy.add(answer_id)

    def live(self, message: dict[str, Any]) -> dict[str, Any]:
        """The message as a page should see it now: a streaming answer with its text so far."""
        text = self.partial.get(message["id"]) if message["status"] == "streaming" else None
        return {**message, "content": "".join(text)} if text else message

    async def prompt(
        self, state: State, space: dict[str, Any], thread: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The chat messages for an answer to the last of `thread`, cut to the token budget and to
        the images a request may carry, oldest messages dropped first."""
        tools = self.offers_tools(state)
        system = system_prompt(state.model_name, space, self.store.notes(space["id"], "pinned"), tools)
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

        def build(drop: int) -> list[dict[str, Any]]:
            return [{"role": "system", "content": system}, *thread_turns(thread[drop:], images)]

        async def fits(drop: int) -> bool:
            if vision and sum(len(m["images"]) for m in thread[drop:]) > most_images:
                return False
            return await count_tokens(self.server, state, build(drop), tools) <= budget

        if await fits(0):
            return build(0)
        low, high = 1, len(thread) - 1  # the fewest drops that fit lie in [low, high], if any does
        if not await fits(high):
            raise bad_request(
                f"the message and the Space's memory need more than the {budget} tokens (or "
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
        return build(low)

    async def start(
        self, state: State, caller: Key | None, space: dict[str, Any], thread: list[dict[str, Any]]
    ) -> ChatRun:
        """Queues the model's answer to the last message of `thread`; raises the API's error (429
        when the team pool is spent, 400 for what the request cannot hold) before anything is stored.
        A key answering in another team's Space (an admin's) draws on that team's pool."""
        if caller is not None and caller.id is not None and caller.team != space["team"]:
            caller = replace(caller, team=space["team"])
        messages = await self.prompt(state, space, thread)
        longest = min(self.limits.max_tokens, state.defaults.get("max_tokens") or self.limits.max_tokens)
        body: dict[str, Any] = {"messages": messages, "max_tokens": longest}
        if self.offers_tools(state):
            body["tools"] = [REMEMBER]
        request = protocol.ChatRequest.model_validate(body)
        return await self.server.start_chat(state, caller, request, "space")

    def run(self, state: State, run: ChatRun, answer: dict[str, Any], asker: str) -> None:
        """Streams `run` into the answer's row and to every open page, in the background."""
        mid = answer["id"]
        self.busy.add(mid)
        self.partial[mid] = []
        task = asyncio.ensure_future(self._stream(state, run, answer, asker))
        self.tasks[mid] = task

        def done(_: asyncio.Task[None]) -> None:
            self.tasks.pop(mid, None)
            self.partial.pop(mid, None)
            self.busy.discard(mid)

        task.add_done_callback(done)

    async def _stream(self, state: State, run: ChatRun, answer: dict[str, Any], asker: str) -> None:
        space, mid = answer["space"], answer["id"]
        text, length = self.partial[mid], 0  # the answer so far, and its length in characters
        calls: list[dict[str, str]] = []
        status, error = "done", None
        started = time.monotonic()
        chunks = chat_chunks(run.head, run.outputs, run.n, state.tokenizer, False, run.plan.tool_names)
        try:
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    if delta.get("content"):  # the offset lets a page that missed a delta notice it
                        self.hub.publish(
                            space, "delta", {"id": mid, "offset": length, "text": delta["content"]}
                        )
                        text.append(delta["content"])
                        length += len(delta["content"])
                    for call in delta.get("tool_calls") or ():
                        function = call.get("function") or {}
                        if function.get("name") or not calls:
                            calls.append({"name": function.get("name") or "", "arguments": ""})
                        calls[-1]["arguments"] += function.get("arguments") or ""
        except asyncio.CancelledError:
            status = "stopped"
        except (APIError, RequestError) as e:
            status, error = "error", e.message if isinstance(e, APIError) else str(e)
        except Exception as e:  # a bug must not leave the answer streaming forever
            log.exception("answer %d failed", mid)
            status, error = "error", f"internal error: {type(e).__name__}"
        finally:
            await chunks.aclose()  # aborts the engine request when stopped; settles its ledger row
        t = run.tracker
        cost = self.server.config.prices.cost(t.prompt_tokens, t.cached_tokens, t.tokens)
        usage = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.tokens, "cost": cost}
        latency = time.monotonic() - started
        self.store.charge(run.head["id"], space, mid, asker, {**usage, "latency": latency})
        for call in calls:
            self.propose(state, space, call)
        self.store.update_answer(
            mid, content="".join(text), status=status, error=error, usage=usage, tool_calls=calls
        )
        self.hub.notify(space)
        self.hub.publish(space, "credits", self.credits(space))

    def propose(self, state: State, space: str, call: dict[str, str]) -> None:
        """A `remember` call becomes a proposed note that a member confirms or dismisses."""
        try:
            note = json.loads(call["arguments"]).get("note", "").strip()
        except (json.JSONDecodeError, AttributeError):
            note = ""
        if call["name"] == "remember" and note:
            self.store.add_note(space, note, state.model_name, "proposed")
