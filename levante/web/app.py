"""The web app's routes: the page, its static files and the JSON + SSE API under /web/api that the
page (and any API client with a key) uses. Mounted on `levante serve`'s own FastAPI app; the
OpenAI API knows nothing of it."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from levante.api.errors import APIError, bad_request
from levante.api.images import resolve
from levante.api.server import Server
from levante.errors import LevanteError
from levante.metering.ledger import month_start
from levante.metering.prices import team_cost
from levante.web import auth
from levante.web.answers import AnswerLimits, Answers, mentions
from levante.web.auth import Member
from levante.web.events import Hub
from levante.web.model_page import model_facts
from levante.web.store import Store

STATIC = Path(__file__).parent / "static"
UPTIME_SECONDS = 30.0  # how often the server notes it is up (the model page's 30-day uptime)
MAX_ID = 2**63 - 1  # SQLite's largest row id
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass
class WebConfig:
    store: Path  # the Spaces SQLite file
    limits: AnswerLimits = field(default_factory=AnswerLimits)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignIn(_Body):
    key: str = Field(max_length=512)


class Authored(_Body):
    author: str | None = Field(default=None, max_length=64)  # who, in the local workspace (no keys)


class NewSpace(Authored):
    title: str = Field(min_length=1, max_length=200)
    team: str | None = Field(default=None, min_length=1, max_length=200)  # admins only


class SpaceEdit(_Body):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    # labels of the operator's MCP servers whose tools the Space's answers may use, or no longer
    enable: list[str] = Field(default_factory=list, max_length=64)
    disable: list[str] = Field(default_factory=list, max_length=64)


class Post(Authored):
    content: str = Field(default="", max_length=100_000)
    images: list[str] = Field(default_factory=list)


class NoteText(Authored):
    text: str = Field(min_length=1, max_length=4000)


def note_text(body: NoteText) -> str:
    text = body.text.strip()
    if not text:
        raise bad_request("text: a note needs some text", "text")
    return text


def _not_found(what: str) -> APIError:
    return APIError(404, f"{what} does not exist or is not shared with your team", code="not_found")


async def _image(url: str, i: int, server: Server) -> tuple[str, str, bytes]:
    """An uploaded image checked as the API checks images: (its data URL, mime type, bytes)."""
    checked = await resolve(url, server.config.images, f"images[{i}]")
    head, _, data = checked.partition(",")
    return checked, head.removeprefix("data:").split(";")[0], base64.b64decode(data)


def _lock(store: Path) -> IO[bytes]:
    """Holds the store for this server's life: a second server on the same file would mark this
    one's answers stopped and never see its live events."""
    store.parent.mkdir(parents=True, exist_ok=True)
    handle = (store.parent / f"{store.name}.lock").open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LevanteError(
            f"{store} is in use by another levante serve: give this one its own --spaces-db, or --no-web"
        ) from None
    return handle


def install(app: FastAPI, server: Server, config: WebConfig) -> None:
    held = _lock(config.store)
    store = Store(config.store)
    hub = Hub()
    for orphan in store.orphaned_answers():
        store.update_answer(orphan, status="stopped", error="the server stopped before this answer finished")

    def credits(space_id: str) -> dict[str, Any]:
        space = store.space(space_id)
        assert space is not None
        since = month_start(time.time())
        if server.ledger is not None and auth.keys_required(server):
            spent, budget = server.ledger.team_month(space["team"])
        else:
            spent, budget = store.team_spent(space["team"], since), None
        return {
            "team": space["team"],
            "monthly_budget": budget,
            "team_spent": spent,
            "space_spent": store.space_spent(space_id, since),
        }

    answers = Answers(server, store, hub, config.limits, credits)
    started = time.time()

    def heartbeat() -> None:
        while True:
            store.heartbeat(started)
            time.sleep(UPTIME_SECONDS)

    threading.Thread(target=heartbeat, name="levante-uptime", daemon=True).start()
    app.state.spaces_lock = held  # released when the process exits

    def member(request: Request) -> Member:
        return auth.require(server, store, request)

    def visible(who: Member, space_id: str) -> dict[str, Any]:
        space = store.space(space_id)
        if space is None or not who.sees(space["team"]):
            raise _not_found(f"Space {space_id!r}")
        return space

    def own(space: dict[str, Any], found: dict[str, Any] | None, what: str) -> dict[str, Any]:
        if found is None or found["space"] != space["id"]:
            raise _not_found(what)
        return found

    def lookup(getter: Any, ref: int) -> dict[str, Any] | None:
        try:
            return getter(ref)
        except KeyError:
            return None

    def author(who: Member, given: str | None) -> str:
        if who.name is not None:
            return who.name
        name = (given or "").strip()
        if not name:
            raise bad_request("author: name yourself to post in the local workspace", "author")
        return name

    # ---- the page ------------------------------------------------------------------------------

    def page(status: int) -> FileResponse:
        return FileResponse(STATIC / "index.html", status, headers={"Content-Security-Policy": CSP})

    for path in ("/", "/model"):
        app.add_api_route(path, lambda: page(200), methods=["GET"], include_in_schema=False)

    @app.get("/spaces/{space_id}", include_in_schema=False)
    async def space_page(space_id: str, request: Request) -> FileResponse:
        """404 for a signed-in member of another team (the page then says so); the sign-in form
        for whoever is not signed in yet."""
        who = auth.signed_in(server, store, request)
        space = store.space(space_id)
        hidden = who is not None and (space is None or not who.sees(space["team"]))
        return page(404 if hidden else 200)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- who -----------------------------------------------------------------------------------

    def me(who: Member | None) -> dict[str, Any]:
        state = server.ready()
        return {
            "mode": "keys" if auth.keys_required(server) else "local",
            "member": who.public() if who is not None else None,
            "csrf": who.csrf if who is not None else None,
            "model": {"name": state.model_name, "tools": answers.offers_tools(state)},
        }

    @app.get("/web/api/me")
    async def whoami(request: Request) -> dict[str, Any]:
        return me(auth.signed_in(server, store, request))

    @app.post("/web/api/session")
    async def sign_in(body: SignIn, request: Request, response: Response) -> dict[str, Any]:
        secure = request.url.scheme == "https"
        return me(auth.sign_in(server, store, body.key, response, secure))

    @app.delete("/web/api/session", status_code=204)
    async def sign_out(request: Request) -> Response:
        member(request)
        response = Response(status_code=204)
        auth.sign_out(store, request, response)
        return response

    # ---- spaces --------------------------------------------------------------------------------

    @app.get("/web/api/spaces")
    async def list_spaces(request: Request) -> dict[str, Any]:
        who = member(request)
        return {"data": store.spaces(None if who.admin else who.team)}

    @app.post("/web/api/spaces", status_code=201)
    async def create_space(body: NewSpace, request: Request) -> dict[str, Any]:
        who = member(request)
        if body.team is not None and not who.admin:
            raise APIError(403, "team: only admin keys create Spaces for another team", param="team")
        title = body.title.strip()
        if not title:
            raise bad_request("title: give the Space a name", "title")
        return store.create_space(body.team or who.team, title, author(who, body.author))

    @app.get("/web/api/spaces/{space_id}")
    async def open_space(space_id: str, request: Request) -> dict[str, Any]:
        space = visible(member(request), space_id)
        return {
            "space": space,
            "mcp_servers": answers.mcp_servers(),
            "messages": [answers.live(m) for m in store.messages(space_id)],
            "notes": store.notes(space_id),
            "credits": credits(space_id),
            "cursor": store.cursor(space_id),
        }

    @app.post("/web/api/spaces/{space_id}/messages", status_code=201)
    async def post(space_id: str, body: Post, request: Request) -> dict[str, Any]:
        """A member's message; one that @-mentions the model is answered in the thread. Whatever
        refuses the answer (the team pool spent, a prompt too long) refuses the post: nothing is
        stored, so nothing is half-written."""
        who = member(request)
        space = visible(who, space_id)
        name = author(who, body.author)
        content = body.content.strip()
        if not content and not body.images:
            raise bad_request("content: write something or attach an image", "content")
        if len(body.images) > server.config.images.max_images:
            raise bad_request(f"images: at most {server.config.images.max_images} per message", "images")
        checked = [await _image(url, i, server) for i, url in enumerate(body.images)]
        state = server.ready()
        pending = None
        if mentions(content, state.model_name):
            urls = [url for url, _, _ in checked]
            asking = {"role": "user", "author": name, "content": content, "images": urls, "status": "done"}
            asking["tool_calls"] = []
            pending = await answers.start(state, who.key, space, [*store.messages(space_id), asking])
        images = [(mime, data) for _, mime, data in checked]
        message, answer = store.post(
            space_id, name, content, images, {"model": state.model_name} if pending is not None else None
        )
        hub.notify(space_id)
        if pending is not None and answer is not None:
            answers.run(state, pending, answer, name)
        return {"message": message, "answer": answer}

    def answer_of(space: dict[str, Any], message_id: int) -> dict[str, Any]:
        found = own(space, lookup(store.message, message_id), f"message {message_id}")
        if found["role"] != "assistant":
            raise bad_request(f"message {message_id} is not an answer of the model", "message_id")
        return found

    @app.post("/web/api/spaces/{space_id}/messages/{message_id}/stop")
    async def stop(space_id: str, message_id: RowId, request: Request) -> dict[str, Any]:
        answer = answer_of(visible(member(request), space_id), message_id)
        task = answers.tasks.get(message_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        elif answer["status"] == "streaming" and message_id not in answers.busy:  # left by a restart
            store.update_answer(message_id, status="stopped")
            hub.notify(space_id)
        return answers.live(store.message(message_id))

    @app.post("/web/api/spaces/{space_id}/messages/{message_id}/regenerate")
    async def regenerate(
        space_id: str, message_id: RowId, request: Request, body: Authored | None = None
    ) -> dict[str, Any]:
        who = member(request)
        space = visible(who, space_id)
        answer_of(space, message_id)
        name = author(who, body.author if body is not None else None)
        state = server.ready()
        answers.claim(message_id)  # before the first await: a second click gets 409, not a second run
        try:
            pending = await answers.start(state, who.key, space, store.messages(space_id, before=message_id))
            fresh = store.update_answer(
                message_id,
                content="",
                status="streaming",
                error=None,
                usage=None,
                tool_calls=[],
                asked_by=name,
                model=state.model_name,
            )
        except BaseException:
            answers.busy.discard(message_id)
            raise
        hub.notify(space_id)
        answers.run(state, pending, fresh, name)
        return fresh

    @app.get("/web/api/spaces/{space_id}/events")
    async def events(
        space_id: str, request: Request, after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None
    ) -> StreamingResponse:
        visible(member(request), space_id)
        last = request.headers.get("last-event-id", "")
        if last.isascii() and last.isdigit() and int(last) <= MAX_ID:
            start = int(last)  # the browser reconnecting: what it saw last
        else:
            start = after if after is not None else store.cursor(space_id)

        def render(kind: str, ref: int) -> dict[str, Any] | None:
            if kind == "note_deleted":
                return {"id": ref}
            if kind == "space":
                return store.space(space_id)
            if kind == "message":
                found = lookup(store.message, ref)
                return answers.live(found) if found else None
            note = lookup(store.note, ref)
            return {k: v for k, v in note.items() if k != "space"} if note else None

        def allowed() -> bool:
            """Still signed in and on the Space's team (a revoked key's stream ends)."""
            who = auth.signed_in(server, store, request)
            space = store.space(space_id)
            return who is not None and space is not None and who.sees(space["team"])

        stream = hub.stream(store, space_id, start, render, lambda: server.draining, allowed)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    @app.patch("/web/api/spaces/{space_id}")
    async def edit_space(space_id: str, body: SpaceEdit, request: Request) -> dict[str, Any]:
        """Renames the Space, or enables or disables MCP servers for its answers (any of the
        operator's, by label; merged into what the Space has, so two members' changes never undo
        each other). Every member of the team sees the change live."""
        visible(member(request), space_id)
        title = body.title.strip() if body.title is not None else None
        if title == "":
            raise bad_request("title: give the Space a name", "title")
        configured = server.mcp.names() if server.mcp is not None else []
        for i, label in enumerate(body.enable):
            if label not in configured:
                known = ", ".join(configured) or "none (start the server with --mcp-config)"
                raise bad_request(
                    f"enable[{i}]: no MCP server {label!r}; configured: {known}", f"enable[{i}]"
                )
        space = store.update_space(space_id, title=title, enable=body.enable, disable=body.disable)
        hub.notify(space_id)
        return space

    # ---- memory --------------------------------------------------------------------------------

    def note_of(space: dict[str, Any], note_id: int) -> dict[str, Any]:
        return own(space, lookup(store.note, note_id), f"note {note_id}")

    def changed(space_id: str, note: dict[str, Any]) -> dict[str, Any]:
        hub.notify(space_id)
        return {k: v for k, v in note.items() if k != "space"}

    @app.post("/web/api/spaces/{space_id}/notes", status_code=201)
    async def add_note(space_id: str, body: NoteText, request: Request) -> dict[str, Any]:
        who = member(request)
        visible(who, space_id)
        return changed(space_id, store.add_note(space_id, note_text(body), author(who, body.author)))

    @app.patch("/web/api/spaces/{space_id}/notes/{note_id}")
    async def edit_note(space_id: str, note_id: RowId, body: NoteText, request: Request) -> dict[str, Any]:
        note_of(visible(member(request), space_id), note_id)
        return changed(space_id, store.update_note(note_id, text=note_text(body)))

    @app.post("/web/api/spaces/{space_id}/notes/{note_id}/confirm")
    async def confirm_note(space_id: str, note_id: RowId, request: Request) -> dict[str, Any]:
        note_of(visible(member(request), space_id), note_id)
        return changed(space_id, store.update_note(note_id, status="pinned"))

    @app.delete("/web/api/spaces/{space_id}/notes/{note_id}", status_code=204)
    async def delete_note(space_id: str, note_id: RowId, request: Request) -> Response:
        note_of(visible(member(request), space_id), note_id)
        store.delete_note(note_id)
        hub.notify(space_id)
        return Response(status_code=204)

    # ---- export and images ---------------------------------------------------------------------

    @app.get("/web/api/spaces/{space_id}/export.json")
    async def export_json(space_id: str, request: Request) -> JSONResponse:
        space = visible(member(request), space_id)
        messages = store.messages(space_id)
        images = {url: store.data_url(url.rsplit("/", 1)[1]) for m in messages for url in m["images"]}
        body = {"space": space, "notes": store.notes(space_id), "messages": messages, "images": images}
        return JSONResponse(
            body, headers={"Content-Disposition": f'attachment; filename="space-{space_id}.json"'}
        )

    @app.get("/web/api/spaces/{space_id}/export.md")
    async def export_markdown(space_id: str, request: Request) -> Response:
        space = visible(member(request), space_id)
        text = markdown(space, store.notes(space_id), store.messages(space_id))
        disposition = f'attachment; filename="space-{space_id}.md"'
        return Response(
            text, media_type="text/markdown; charset=utf-8", headers={"Content-Disposition": disposition}
        )

    @app.get("/web/api/images/{image_id}")
    async def image(image_id: str, request: Request) -> Response:
        who = member(request)
        found = store.image(image_id)
        space = store.space(found[0]) if found else None
        if found is None or space is None or not who.sees(space["team"]):
            raise _not_found(f"image {image_id!r}")
        return Response(found[2], media_type=found[1], headers={"Cache-Control": "private, max-age=86400"})

    # ---- the model page ------------------------------------------------------------------------

    @app.get("/web/api/model")
    async def model(request: Request) -> dict[str, Any]:
        member(request)
        state = server.ready()
        store.heartbeat(started)  # up until now, not until the last heartbeat
        return model_facts(server, state, store, answers.offers_tools(state))

    @app.get("/web/api/cost")
    async def cost(
        request: Request,
        seats: Annotated[int, Query(ge=1, le=1_000_000)],
        messages_per_day: Annotated[int, Query(ge=1, le=1_000_000)],
        input_tokens: Annotated[int, Query(ge=1, le=10_000_000)],
        output_tokens: Annotated[int, Query(ge=1, le=10_000_000)],
        days: Annotated[int, Query(ge=1, le=366)] = 30,
    ) -> dict[str, Any]:
        member(request)
        return team_cost(server.config.prices, seats, messages_per_day, input_tokens, output_tokens, days)

    server.links.append(("open the web app", "/"))


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def markdown(space: dict[str, Any], notes: list[dict[str, Any]], messages: list[dict[str, Any]]) -> str:
    """A Space as a Markdown document: its memory, then the thread."""
    lines = [f"# {space['title']}", "", f"Team {space['team']} · created {_when(space['created'])}", ""]
    pinned = [n for n in notes if n["status"] == "pinned"]
    if pinned:
        lines += ["## Memory", "", *[f"- {n['text']}" for n in pinned], ""]
    lines += ["## Thread", ""]
    for m in messages:
        who = f"**{m['author']}**"
        if m["role"] == "assistant":
            usage = m["usage"] or {}
            cost = f", ${usage['cost']:.6f}" if usage else ""
            who += f" (asked by {m['asked_by']}{cost}; {m['status']})"
        lines += [f"{who} — {_when(m['created'])}", "", m["content"] or "_(no text)_", ""]
        lines += [f"![image]({url})" for url in m["images"]]
        for call in m["tool_calls"]:
            lines += _call_lines(call)
        if m["images"] or m["tool_calls"]:
            lines.append("")
    return "\n".join(lines)


def _call_lines(call: dict[str, Any]) -> list[str]:
    """A tool call in the Markdown export: what was called, then an MCP call's result or error
    in a fence longer than any backtick run inside it."""
    name = f"{call['server_label']}.{call['name']}" if call.get("type") == "mcp_call" else call["name"]
    head = f"`{name}({call['arguments']})`"
    if call.get("type") != "mcp_call":
        return [head]
    took = f", {call['duration']:.2f} s" if call.get("duration") is not None else ""
    result = call["output"] if call["error"] is None else f"error: {call['error']}"
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", result or "")), default=0))
    return [f"{head} — {call['status']}{took}", "", fence, result or "", fence, ""]
