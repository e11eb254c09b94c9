"""`levante serve`: the OpenAI-compatible HTTP server.

The port opens at once and answers 503 until the model has loaded (so orchestrators can tell
"starting" from "dead"); SIGTERM stops new requests with 503, lets the ones in flight finish
(bounded by --shutdown-timeout) and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.metadata
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from levante.api import protocol, tools
from levante.api.errors import APIError, bad_request, install
from levante.api.images import ImagePolicy, resolve_messages
from levante.api.metrics import Metrics, RequestTracker
from levante.api.responses import Choice, chat_chunks, chat_response, completion_chunks, completion_response
from levante.api.responses_api import Responder, ResponsesRequest, ResponseStore
from levante.engine import AsyncEngine, Engine, EngineConfig, RequestError, SamplingParams
from levante.engine.engine import Output
from levante.engine.grammar import GrammarError
from levante.errors import LevanteError, TokenizerError
from levante.mcp import MCPServers, load_config
from levante.metering.ledger import GROUPS, Entry, Key, Ledger, parse_day
from levante.metering.prices import Prices
from levante.tokenizer import PromptInputs

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerConfig:
    model: str | None = None  # None: the demo model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None  # int8 | int4 | int4-g64 | int4-g128: quantize a float checkpoint at load
    mmproj: str | None = None  # llama.cpp's vision file for a GGUF model
    tokenizer: str | None = None  # where the tokenizer comes from, when not the model's own
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_key: str | None = None
    generation_config: str = "auto"  # auto (the model's file), vllm (none) or a directory
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_queue: int = 256  # waiting sequences beyond which requests get 429
    max_request_bytes: int = 64 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_prompts: bool = False
    default_system_prompt: bool = True
    usage_db: Path | None = None  # the SQLite usage ledger: API keys, budgets, one row per request
    prices: Prices = field(default_factory=Prices)
    mcp_config: Path | None = None  # the operator's MCP servers (mcpServers JSON) that responses may call
    responses_db: Path | None = None  # stored responses (previous_response_id); None: kept in memory
    max_tool_rounds: int = 8  # generate → run tools → generate … at most this many times per response
    tool_timeout: float = 60.0  # seconds one MCP tool call may take


ADMIN = Key(id=None, team=None, name="--api-key", hint="", admin=True)
"""Who a request made with the server's single --api-key is."""


_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(setting: str, model_path: Path) -> dict[str, Any]:
    """Server-side sampling defaults from a generation_config.json, as vLLM's --generation-config."""
    if setting == "vllm":
        return {}
    directory = model_path if setting == "auto" else Path(setting)
    path = directory / "generation_config.json"
    if not path.is_file():
        if setting != "auto":
            raise LevanteError(f"{path}: no such file (--generation-config)")
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LevanteError(f"{path}: not readable JSON ({e})") from None
    return {ours: raw[theirs] for theirs, ours in _GENERATION_KEYS.items() if raw.get(theirs) is not None}


def base_url(cfg: ServerConfig) -> str:
    """Where a browser or curl on this machine reaches the server."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def curl_example(cfg: ServerConfig, model_name: str) -> str:
    """A ready-to-paste request, printed at start so a new user has something that works."""
    body = {"model": model_name, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    auth = ' -H "Authorization: Bearer $LEVANTE_API_KEY"' if cfg.api_key else ""
    return (
        f"curl {base_url(cfg)}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{json.dumps(body)}'"
    )


@dataclass
class State:
    """What the handlers need once the model is loaded."""

    engine: AsyncEngine
    model_name: str
    defaults: dict[str, Any]
    metrics: Metrics

    @property
    def tokenizer(self) -> Any:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


@dataclass
class ChatRun:
    """A queued chat request: the response head, its tracked outputs, how to read them, and the
    tracker that counts what the ledger will bill (also when the outputs are closed early)."""

    head: dict[str, Any]
    outputs: AsyncIterator[tuple[int, Output]]
    plan: tools.Structured
    n: int
    tracker: RequestTracker


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state: State | None = None
        self.draining = False
        self.load_error: str | None = None
        self.created = int(time.time())
        self.ledger = Ledger(config.usage_db) if config.usage_db is not None else None
        servers = load_config(config.mcp_config) if config.mcp_config is not None else None
        self.mcp = MCPServers(servers, call_timeout=config.tool_timeout) if servers is not None else None
        store = ResponseStore(config.responses_db or Path(":memory:"))
        self.responder = Responder(self, self.mcp, store, config.max_tool_rounds)
        self.links: list[tuple[str, str]] = []  # (what, path) printed under the curl line when ready

    # ---- lifecycle ------------------------------------------------------------------------

    def load(self) -> None:
        from levante.loader import load

        cfg = self.config
        loaded = load(
            cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            default_system_prompt=cfg.default_system_prompt,
            quantization=cfg.quantization,
            mmproj=cfg.mmproj,
            tokenizer=cfg.tokenizer,
        )
        engine = AsyncEngine(Engine(loaded.model, loaded.tokenizer, cfg.engine))
        path = loaded.path
        name = cfg.served_model_name or (path.name if path.is_dir() else path.stem)
        defaults = generation_defaults(cfg.generation_config, path if path.is_dir() else path.parent)
        if defaults:
            log.info("sampling defaults from generation_config.json: %s", defaults)
        self.state = State(engine, name, defaults, Metrics(engine, name))
        log.info("ready: serving %s as %r on http://%s:%d", loaded.path, name, cfg.host, cfg.port)
        log.info("try it:\n%s", curl_example(cfg, name))
        for what, path in self.links:
            log.info("%s: %s%s", what, base_url(cfg), path)

    def ready(self) -> State:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.state is None:
            raise APIError(503, "the model is still loading", code="starting", headers={"Retry-After": "5"})
        return self.state

    def authorize(self, request: Request) -> Key | None:
        """Who is asking: the --api-key holder, a ledger key, or nobody when no key is configured."""
        single, ledger = self.config.api_key, self.ledger
        if single is None and (ledger is None or not ledger.has_keys()):
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )
        if single is not None and hmac.compare_digest(given.encode(), single.encode()):
            return ADMIN
        key = ledger.authenticate(given) if ledger is not None else None
        if key is None:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        if key.revoked is not None:
            raise APIError(401, f"The API key {key.hint}… has been revoked", code="invalid_api_key")
        return key

    def check_budget(self, caller: Key | None) -> None:
        """A key whose own or whose team's monthly budget is spent may not start a request; one
        already running finishes (and is billed)."""
        reason = self.ledger.over_budget(caller) if self.ledger is not None and caller is not None else None
        if reason is not None:
            message = f"Budget exceeded: {reason}"
            raise APIError(429, message, code="budget_exceeded", kind="insufficient_quota")

    def settle(
        self,
        state: State,
        caller: Key | None,
        rid: str,
        endpoint: str,
        trackers: list[RequestTracker],
        n: int,
    ) -> None:
        """Writes the request's ledger row, before its response or last chunk can reach the client."""
        if self.ledger is None:
            return
        prompt = sum(t.prompt_tokens for t in trackers)
        cached = sum(t.cached_tokens for t in trackers)
        completion = sum(t.tokens for t in trackers)
        reasons = [r for t in trackers for r in t.reasons]
        if any(t.error for t in trackers):
            reason = "error"
        elif len(reasons) < n * len(trackers):
            reason = "abort"
        else:
            reason = ",".join(sorted(set(reasons)))
        entry = Entry(
            request_id=rid,
            key=caller,
            model=state.model_name,
            endpoint=endpoint,
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            cost=self.config.prices.cost(prompt, cached, completion),
            latency=time.monotonic() - min(t.start for t in trackers),
            finish_reason=reason,
            time=time.time(),
        )
        self.ledger.record(entry)

    def check_model(self, state: State, model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # ---- requests into the engine -----------------------------------------------------------

    def _check_room(self, state: State, prompt_len: int, params: SamplingParams, where: str) -> None:
        limit = state.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{prompt_len} tokens.",
                where,
                "context_length_exceeded",
            )
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise bad_request(
                f"max_tokens is too large: {params.max_tokens} new tokens after a {prompt_len}-token "
                f"prompt exceed the maximum context length of {limit} tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        if state.engine.num_queued >= self.config.max_queue:
            raise APIError(
                429,
                "the server's queue is full; retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    async def start_chat(
        self, state: State, caller: Key | None, req: protocol.ChatRequest, endpoint: str
    ) -> ChatRun:
        """A chat request checked (budget, fields, grammar, context), encoded and queued; its
        outputs settle the ledger row (under `endpoint`) however they end. The web app's Spaces
        ask the model through here too, so they are billed and refused exactly as the API is."""
        self.check_budget(caller)
        _refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        plan = await asyncio.to_thread(_structured, req, state)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        messages = await resolve_messages(messages, self.config.images)
        specs = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            inputs = await asyncio.to_thread(state.tokenizer.encode_chat, messages, specs)
        except TokenizerError as e:
            raise bad_request(str(e), "messages") from None
        params = _params(
            req,
            state,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        params = replace(params, grammar=plan.grammar)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.submit(state, inputs, params, rid, "messages")
        logged = repr(messages)[:2000] if self.config.log_prompts else None
        trackers = [RequestTracker(state.metrics, rid, logged)]
        outputs = _tracked(
            [stream], trackers, lambda: self.settle(state, caller, rid, endpoint, trackers, params.n)
        )
        head = {"id": rid, "created": int(time.time()), "model": state.model_name}
        return ChatRun(head, outputs, plan, params.n, trackers[0])

    async def submit(
        self, state: State, inputs: PromptInputs, params: SamplingParams, rid: str, where: str
    ) -> AsyncIterator[Output]:
        self._check_room(state, len(inputs.tokens), params, where)
        try:
            return await state.engine.add_request(inputs, params, rid)
        except RequestError as e:
            raise bad_request(str(e), where) from None


def _params(
    req: protocol.SamplingFields,
    state: State,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    try:
        return protocol.sampling_params(
            req, state.defaults, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs
        )
    except ValueError as e:
        message = str(e)
        return_field = message.split(" ")[0].split(":")[0].split(".")[0]
        raise bad_request(message, return_field if return_field in type(req).model_fields else None) from None


def _structured(req: protocol.ChatRequest, state: State) -> tools.Structured:
    """The request's grammar, compiled here (off the engine thread, and into the engine's cache) so
    that one the grammar engine refuses is a 400 before the request is queued."""
    plan = tools.structured(req, state.tokenizer)
    if plan.grammar is not None:
        try:
            state.engine.engine.grammars.matcher(plan.grammar)
        except GrammarError as e:
            where = "tools" if req.tools else "response_format"
            raise bad_request(f"{where}: the grammar engine cannot compile the request: {e}", where) from None
    return plan


def _refuse_unsupported(req: protocol.SamplingFields) -> None:
    name = protocol.unsupported_field(req)
    if name is not None:
        raise bad_request(
            f"'{name}' is not supported ({protocol.UNSUPPORTED[name]}); remove it from the request",
            name,
            "unsupported_parameter",
        )


async def _merge(streams: list[AsyncIterator[Output]]) -> AsyncIterator[tuple[int, Output]]:
    """Deltas of several engine requests (a completions batch) as they come, tagged by prompt."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Output] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Output]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except BaseException as e:
            queue.put_nowait(e)
            raise
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # a consumer that left early aborts every prompt's request


async def _tracked(
    streams: list[AsyncIterator[Output]], trackers: list[RequestTracker], settle: Callable[[], None]
) -> AsyncIterator[tuple[int, Output]]:
    """Feeds the trackers and settles the request once its outputs end — however they end — with
    no await in between, so a cancelled (disconnected) request is settled too."""
    try:
        async for i, out in _merge(streams):
            trackers[i].observe(out)
            yield i, out
    except (RequestError, APIError):
        for t in trackers:
            t.error = True
        raise
    finally:
        for t in trackers:
            t.finish()
        settle()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs a non-streaming request, cancelling it (which aborts it in the engine) if the client
    goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the connection")


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except (APIError, RequestError) as e:  # failed mid-stream: the client gets it as an event
            err = e if isinstance(e, APIError) else bad_request(str(e))
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if server.mcp is not None:
            await server.mcp.start()  # a broken MCP server is logged and retried; the API serves anyway
        yield
        if server.mcp is not None:
            await server.mcp.stop()
        if server.state is not None:
            server.state.engine.close()

    app = FastAPI(title="Levante", version=importlib.metadata.version("levante"), lifespan=lifespan)
    install(app)
    cfg = server.config

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            return APIError(413, f"the request body is over {cfg.max_request_bytes} bytes").response()
        return await call_next(request)

    def begin(request: Request, model: str | None) -> tuple[State, Key | None]:
        state = server.ready()
        caller = server.authorize(request)
        server.check_model(state, model)
        return state, caller

    def priced(usage: dict[str, Any]) -> dict[str, Any]:
        """The request's cost (USD, at the server's prices) next to OpenAI's usage fields."""
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        cost = cfg.prices.cost(usage["prompt_tokens"], cached, usage["completion_tokens"])
        return {**usage, "cost": cost}

    async def priced_chunks(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in chunks:
            yield {**chunk, "usage": priced(chunk["usage"])} if "usage" in chunk else chunk

    @app.get("/health")
    async def health() -> Response:
        server.ready()
        if server.mcp is None:
            return Response(status_code=200)
        return JSONResponse({"status": "ok", "mcp": server.mcp.status()})  # down MCP servers do not fail it

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("levante")}

    @app.get("/metrics")
    async def metrics() -> Response:
        state = server.ready()
        if server.mcp is not None:
            state.metrics.observe_mcp(server.mcp.status())
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state, _ = begin(request, None)
        card = {
            "id": state.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "levante",
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(req: protocol.ChatRequest, request: Request) -> Response:
        state, caller = begin(request, req.model)
        run = await server.start_chat(state, caller, req, "chat")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            chunks = chat_chunks(
                run.head, run.outputs, run.n, state.tokenizer, include_usage, run.plan.tool_names
            )
            return _sse(priced_chunks(chunks))
        choices = await _unless_disconnected(request, _collect(run.outputs, run.n, 1))
        body = chat_response(run.head, choices, state.tokenizer, run.plan.tool_names)
        return JSONResponse({**body, "usage": priced(body["usage"])})

    @app.post("/v1/completions")
    async def completions(req: protocol.CompletionRequest, request: Request) -> Response:
        state, caller = begin(request, req.model)
        server.check_budget(caller)
        _refuse_unsupported(req)
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        prompts = _prompts(req.prompt, state)
        logprobs = req.logprobs
        params = _params(
            req,
            state,
            max_tokens=req.max_tokens,
            logprobs=logprobs,
            prompt_logprobs=logprobs if req.echo and logprobs is not None else None,
        )
        if params.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens 0 is only useful with echo", "max_tokens")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams, trackers = [], []
        try:
            for i, inputs in enumerate(prompts):
                sub_id = rid if len(prompts) == 1 else f"{rid}-{i}"
                streams.append(await server.submit(state, inputs, params, sub_id, "prompt"))
                trackers.append(RequestTracker(state.metrics, sub_id, _prompt_text(req, i, cfg.log_prompts)))
        except APIError:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            raise
        outputs = _tracked(
            streams, trackers, lambda: server.settle(state, caller, rid, "completions", trackers, params.n)
        )
        head = {"id": rid, "created": int(time.time()), "model": state.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = [p.tokens for p in prompts] if req.echo else None
        wants = logprobs is not None
        if req.stream:
            chunks = completion_chunks(
                head, outputs, len(prompts), params.n, state.tokenizer, echo, wants, include_usage
            )
            return _sse(priced_chunks(chunks))
        choices = await _unless_disconnected(request, _collect(outputs, params.n, len(prompts)))
        body = completion_response(head, choices, params.n, state.tokenizer, echo, wants)
        return JSONResponse({**body, "usage": priced(body["usage"])})

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, request: Request) -> Response:
        state, caller = begin(request, req.model)
        server.check_budget(caller)
        team = caller.team if caller is not None and not caller.admin else None
        run, offered = server.responder.begin(req, team)
        events = server.responder.events(state, caller, run, offered)
        if req.stream:
            return StreamingResponse(
                _watched(request, _response_events(events)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        last = await _unless_disconnected(request, _last(events))
        return JSONResponse(last["response"])

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request) -> dict[str, Any]:
        _, caller = begin(request, None)
        team = caller.team if caller is not None and not caller.admin else None
        found = server.responder.store.get(response_id, team)
        if found is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
        return found[0]

    @app.post("/tokenize")
    async def tokenize(req: protocol.TokenizeRequest, request: Request) -> dict[str, Any]:
        state, _ = begin(request, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.continue_final_message and req.add_generation_prompt:
            message = "continue_final_message needs add_generation_prompt set to false"
            raise bad_request(message, "continue_final_message")
        try:
            if req.messages is not None:
                messages = await resolve_messages(
                    [m.model_dump(exclude_none=True) for m in req.messages], cfg.images
                )
                specs = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
                encode = functools.partial(
                    state.tokenizer.encode_chat,
                    add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                )
                tokens = (await asyncio.to_thread(encode, messages, specs)).tokens
            else:
                add_bos = req.add_special_tokens and state.tokenizer.adds_bos
                tokens = state.tokenizer.encode(req.prompt or "", add_bos=add_bos)
        except TokenizerError as e:
            raise bad_request(str(e), "messages") from None
        body: dict[str, Any] = {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            body["token_strs"] = [state.tokenizer.decode([t], skip_special=False) for t in tokens]
        return body

    @app.post("/detokenize")
    async def detokenize(req: protocol.DetokenizeRequest, request: Request) -> dict[str, Any]:
        state, _ = begin(request, req.model)
        _check_ids(req.tokens, state, "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens, skip_special=False)}

    @app.get("/v1/usage")
    async def usage(
        request: Request, team: str | None = None, since: str | None = None, group: str = ",".join(GROUPS)
    ) -> dict[str, Any]:
        """The ledger's totals per day / team / key; only for admin keys (or --api-key)."""
        _, caller = begin(request, None)
        if server.ledger is None:
            raise APIError(404, "this server keeps no usage ledger (start it with --usage-db)")
        if caller is not None and not caller.admin:
            raise APIError(403, "reading usage needs an admin key", code="not_admin")
        try:
            start = parse_day(since, "since") if since else None
            groups = tuple(g for g in group.split(",") if g)
            rows = await asyncio.to_thread(server.ledger.report, team, start, groups)
        except LevanteError as e:
            raise bad_request(str(e), "since" if str(e).startswith("since") else "group") from None
        return {"object": "list", "data": rows}

    return app


async def _last(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async for event in events:
        last = event
    return last


async def _watched(request: Request, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`chunks`, ended — and the work behind them cancelled — as soon as the client leaves, not at
    the next write: a tool call can keep a stream quiet for a long time."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if chunk is None:
                await task  # its failure, if it failed
                return
            yield chunk
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _response_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Responses API server-sent events; a failure mid-stream becomes an `error` event."""
    sequence = 0
    try:
        async for event in events:
            sequence = event["sequence_number"] + 1
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception as e:  # the stream has begun: the client learns of the failure as an event
        if not isinstance(e, APIError | RequestError):
            log.exception("a response failed mid-stream")
        err = (
            e
            if isinstance(e, APIError)
            else bad_request(str(e))
            if isinstance(e, RequestError)
            else APIError(500, f"internal error: {type(e).__name__}")
        )
        body = {
            "type": "error",
            "sequence_number": sequence,
            "code": err.code,
            "message": err.message,
            "param": err.param,
        }
        yield f"event: error\ndata: {json.dumps(body)}\n\n"


def _check_ids(ids: list[int], state: State, where: str) -> None:
    vocab = state.engine.engine.model.config.text.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"{where}: token ids outside the vocabulary [0, {vocab}): {bad[:5]}", where)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]], state: State) -> list[PromptInputs]:
    """OpenAI's four prompt shapes: text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]  # type: ignore[list-item]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request("prompt must not be empty", "prompt")
            out.append(PromptInputs(state.tokenizer.encode(p, add_bos=state.tokenizer.adds_bos)))
        else:
            if not p:
                raise bad_request("prompt must not be empty", "prompt")
            _check_ids(p, state, "prompt")
            out.append(PromptInputs(list(p)))
    return out


def _prompt_text(req: protocol.CompletionRequest, i: int, enabled: bool) -> str | None:
    if not enabled:
        return None
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    return str(prompts[i] if i < len(prompts) else prompts)[:2000]


async def _collect(outputs: AsyncIterator[tuple[int, Output]], n: int, num_prompts: int) -> list[Choice]:
    choices = [Choice(index=i) for i in range(n * num_prompts)]
    async for p, out in outputs:
        choices[p * n + out.index].add(out)
    return choices


class _Uvicorn(uvicorn.Server):
    """Flags the server as draining on the first SIGTERM/SIGINT so new requests get 503 while the
    ones in flight finish."""

    def __init__(self, config: uvicorn.Config, server: Server) -> None:
        super().__init__(config)
        self.levante = server

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.levante.draining = True
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the signal once it has shut down gracefully, so the process would die
        by SIGTERM; a server that drained cleanly exits 0 instead."""
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(config: ServerConfig, extend: Callable[[FastAPI, Server], None] | None = None) -> int:
    """Runs until SIGTERM/SIGINT; the exit status for the process. `extend` adds routes (the web
    app) to the API's own app, so both share the port, the engine and the ledger."""
    server = Server(config)
    app = create_app(server)
    if extend is not None:
        extend(app, server)
    uv = _Uvicorn(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=int(config.shutdown_timeout),
        ),
        server,
    )

    def load() -> None:
        try:
            server.load()
        except LevanteError as e:
            server.load_error = str(e)
            uv.should_exit = True
        except Exception as e:  # an unexpected failure must stop the process, not leave it 503 forever
            log.exception("loading the model failed")
            server.load_error = f"{type(e).__name__}: {e}"
            uv.should_exit = True

    threading.Thread(target=load, name="levante-load", daemon=True).start()
    uv.run()
    if server.load_error is not None:
        raise LevanteError(server.load_error)
    return 0
