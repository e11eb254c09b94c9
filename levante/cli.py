"""The `levante` command."""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from levante.errors import LevanteError
from levante.metering.cli import add_db_flag
from levante.metering.prices import add_price_flags, prices_from_args

if TYPE_CHECKING:
    from levante.api.server import ServerConfig
    from levante.engine import LLM, EngineConfig, SamplingParams


def image_data_url(path: Path) -> str:
    """Reads an image file into a data URL (the form OpenAI messages carry images in)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "png").lower()
            img.verify()
    except FileNotFoundError:
        raise LevanteError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LevanteError(f"{path}: not a readable image ({e})") from None
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def user_message(prompt: str, images: list[Path]) -> dict:
    if not images:
        return {"role": "user", "content": prompt}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}


def engine_config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    """The engine settings `model_flags` gives every model command, plus the command's own."""
    from levante.engine import EngineConfig
    from levante.engine.sampling_params import LOOP_GUARD_ON
    from levante.engine.speculative import SpeculativeConfig

    try:
        speculative = SpeculativeConfig.parse(args.speculative_config) if args.speculative_config else None
    except ValueError as e:
        raise LevanteError(f"--speculative-config: {e}") from None
    return EngineConfig(
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        loop_guard=LOOP_GUARD_ON if args.loop_guard else None,
        batch_invariant=not args.no_batch_invariant,
        kv_cache_dtype=args.kv_cache_dtype,
        compile=not args.enforce_eager,
        speculative=speculative,
        **extra,
    )


def server_config(args: argparse.Namespace, engine: EngineConfig, **extra: Any) -> ServerConfig:
    """The server settings `model_flags` (and --served-model-name) give, plus the command's own;
    starts the tensor-parallel workers when --tensor-parallel-size asks for them."""
    from levante.api.server import ServerConfig
    from levante.distributed.tensor_parallel import WorkerSpec, start

    spec = WorkerSpec(args.model, args.dtype, args.device, engine, args.quantization, args.mmproj)
    start(args.tensor_parallel_size, spec)
    return ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        mmproj=args.mmproj,
        tokenizer=args.tokenizer,
        engine=engine,
        default_system_prompt=not args.no_system_prompt,
        **extra,
    )


def make_llm(args: argparse.Namespace) -> LLM:
    from levante.engine import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        engine=engine_config(args, max_num_seqs=1),  # one user at a time: one sequence's worth
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        mmproj=args.mmproj,
        tokenizer=args.tokenizer,
    )


def sampling(args: argparse.Namespace) -> SamplingParams:
    from levante.engine import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    except ValueError as e:
        raise LevanteError(str(e)) from None


def stream_answer(llm: LLM, messages: list[dict], params: SamplingParams) -> str:
    """Prints the answer as it is generated and returns it whole."""
    from levante.engine import RequestError

    parts = []
    try:
        for delta in llm.stream(messages, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
            parts.append(delta)
    except RequestError as e:
        raise LevanteError(str(e)) from None
    sys.stdout.write("\n")
    return "".join(parts)


def cmd_generate(args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(user_message(args.prompt, args.image))
    stream_answer(make_llm(args), messages, sampling(args))


def cmd_chat(args: argparse.Namespace) -> None:
    """A terminal chat: each turn is streamed; /reset forgets the conversation, /exit leaves."""
    llm, params = make_llm(args), sampling(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("levante chat — /reset to start over, /exit or Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": stream_answer(llm, messages, params)})


def cmd_serve(args: argparse.Namespace) -> None:
    ray_flags = args.replicas is not None or args.ray_autoscaling is not None or args.ray_actor_options
    if ray_flags and not args.ray:
        raise LevanteError("--replicas, --ray-autoscaling and --ray-actor-options need --ray")
    if args.replicas is not None and args.ray_autoscaling is not None:
        raise LevanteError("give --replicas or --ray-autoscaling (its min/max_replicas), not both")
    if args.ray and args.tensor_parallel_size > 1:
        raise LevanteError("--tensor-parallel-size shards one engine; with --ray, use --replicas")
    from levante.api.images import ImagePolicy
    from levante.api.server import serve

    logging.getLogger("levante").setLevel(logging.INFO)  # before any tensor-parallel worker starts
    engine = engine_config(
        args,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_caching=not args.no_enable_prefix_caching,
    )
    images = ImagePolicy(
        max_images=args.limit_mm_per_prompt,
        allowed_domains=frozenset(d.strip().lower() for d in args.allowed_media_domains if d.strip()),
    )
    config = server_config(
        args,
        engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        generation_config=args.generation_config,
        images=images,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout,
        log_prompts=args.log_prompts,
        usage_db=args.usage_db,
        prices=prices_from_args(args),
        mcp_config=args.mcp_config,
        responses_db=args.responses_db or data_file(args, "responses"),
        max_tool_rounds=args.max_tool_rounds,
        tool_timeout=args.tool_timeout,
    )
    if args.ray:
        from levante.distributed.ray_serve import RayServeConfig, serve_on_ray

        serve_on_ray(config, RayServeConfig(args.replicas or 1, args.ray_autoscaling, args.ray_actor_options))
    else:
        serve(config, None if args.no_web else web_app(args))
        if args.tensor_parallel_size > 1:
            from levante.distributed.tensor_parallel import exit_served

            exit_served(0)


def data_file(args: argparse.Namespace, stem: str) -> Path:
    """A server's own SQLite file, one per port (two servers on one machine never share one):
    beside --usage-db, else in $LEVANTE_DATA_DIR or ~/.local/share/levante."""
    home = os.environ.get("LEVANTE_DATA_DIR") or Path.home() / ".local/share/levante"
    return (args.usage_db.parent if args.usage_db is not None else Path(home)) / f"{stem}-{args.port}.db"


def web_app(args: argparse.Namespace) -> Callable[..., None]:
    """The Spaces web app on the server's port, its store next to the usage ledger by default."""
    from levante.web import WebConfig, install
    from levante.web.answers import AnswerLimits

    config = WebConfig(
        args.spaces_db or data_file(args, "spaces"),
        AnswerLimits(args.space_context_tokens, args.space_max_tokens),
    )
    return lambda app, server: install(app, server, config)


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="model directory, .gguf file, Hugging Face repo id, or GGUF repo with a quant tag "
        "(org/Model-GGUF:Q4_K_M); default: the SmolLM2 demo model",
    )
    p.add_argument("--revision", help="the Hub revision (branch, tag or commit) of a repo id --model")
    p.add_argument(
        "--mmproj",
        help="llama.cpp's mmproj GGUF for a GGUF --model: the Pixtral vision tower and projector",
    )
    p.add_argument(
        "--tokenizer",
        help="take the tokenizer from this directory or Hub id instead (for a GGUF --model: the original "
        "repo, whose tekken.json handles images and tools)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where the hardware has it natively, else float32",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        help="quantize a float checkpoint's projections at load: int8 (symmetric, groups of 32: Q8_0) "
        "or int4 (asymmetric, see --quantization-group-size); GGUF files keep their own without it",
    )
    p.add_argument(
        "--quantization-group-size",
        type=int,
        choices=[32, 64, 128],
        help="weights per scale and min of --quantization int4 (default 32: GGUF Q4_1; 64, 128: less memory)",
    )
    p.add_argument("--kv-cache-memory", type=positive(float), help="GiB for the KV cache (default: measured)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="auto: the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 hold twice the tokens in the same memory",
    )
    p.add_argument("--max-model-len", type=positive(int), help="context length (default: the model's)")
    p.add_argument("--loop-guard", action="store_true", help="stop answers whose tail keeps repeating")
    p.add_argument(
        "--speculative-config",
        help='speculative decoding, as vLLM: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or '
        '\'{"method": "draft_model", "model": PATH}\' (off by default)',
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("LEVANTE_ENFORCE_EAGER", "") not in ("", "0"),
        help="run the step eagerly, not compiled at start (on CPU its layers in one kernel call where the "
        "model allows, else Inductor); default from LEVANTE_ENFORCE_EAGER=1",
    )
    p.add_argument(
        "--no-batch-invariant",
        action="store_true",
        help="library matmul/attention kernels: a request's numbers may then depend on the rest of the batch",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive(int),
        default=1,
        help="shard the model over N processes (N GPUs with --device cuda); under torchrun, its count",
    )
    p.add_argument(
        "--no-system-prompt",
        action="store_true",
        help="do not add the model's SYSTEM_PROMPT.txt when the conversation has no system message",
    )


FEATURE_COMMANDS: tuple[str, ...] = (
    "levante.metering.cli",
    "levante.batch.cli",
    "levante.evals.cli",
)
"""Modules whose `register(subparsers)` adds their own subcommands (each sets `func`); they keep
heavy imports inside the command so `levante --help` stays fast."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="levante", description="Serve Mistral Small 3.2 yourself.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and chosen")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streamed to stdout")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable)")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="a streaming chat in the terminal")
    c.set_defaults(func=cmd_chat)
    for p in (g, c):
        model_flags(p)
        p.add_argument("--system", help="system message")
        p.add_argument("--max-tokens", type=int, default=512)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--seed", type=int)
    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    s.set_defaults(func=cmd_serve)
    model_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the name clients use (default: the model's file or folder)")
    s.add_argument("--api-key", help="require this bearer key on /v1 endpoints")
    s.add_argument("--max-num-seqs", type=positive(int), default=64, help="sequences in one batch")
    s.add_argument(
        "--max-num-batched-tokens", type=positive(int), default=1024, help="tokens per step (prefill chunk)"
    )
    s.add_argument("--no-enable-prefix-caching", action="store_true")
    s.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults: auto (the model's generation_config.json), vllm (none), or a folder",
    )
    s.add_argument("--limit-mm-per-prompt", type=positive(int), default=10, help="images per request")
    s.add_argument(
        "--allowed-media-domains",
        type=lambda text: text.split(","),
        default=[],
        help="comma-separated domains images may be fetched from (default: none, data: URLs only)",
    )
    s.add_argument("--max-queue", type=positive(int), default=256, help="waiting sequences before 429")
    s.add_argument(
        "--max-request-bytes", type=positive(int), default=64 * 1024 * 1024, help="larger bodies get 413"
    )
    s.add_argument("--shutdown-timeout", type=positive(float), default=30.0, help="seconds to drain")
    s.add_argument("--log-prompts", action="store_true", help="put prompt text in the request log")
    add_db_flag(s, "when set, requests are metered and `levante keys` keys are accepted")
    add_price_flags(s)
    s.add_argument(
        "--no-web",
        action="store_true",
        help="serve the API only, not the Spaces web app at / (never with --ray)",
    )
    s.add_argument(
        "--spaces-db",
        type=Path,
        help="the web app's SQLite file (default: spaces-PORT.db beside --usage-db, else in "
        "$LEVANTE_DATA_DIR or ~/.local/share/levante)",
    )
    s.add_argument(
        "--space-context-tokens",
        type=positive(int),
        default=8192,
        help="prompt tokens a Space answer may read: memory + the newest messages that fit",
    )
    s.add_argument("--space-max-tokens", type=positive(int), default=1024, help="the longest Space answer")
    s.add_argument(
        "--mcp-config",
        type=Path,
        help='MCP servers responses and Spaces may call, in the mcpServers JSON format ({"mcpServers": {…}})',
    )
    s.add_argument(
        "--responses-db",
        type=Path,
        help="stored responses, for previous_response_id (default: beside the Spaces)",
    )
    s.add_argument(
        "--max-tool-rounds", type=positive(int), default=8, help="generate-and-call rounds per response"
    )
    s.add_argument(
        "--tool-timeout", type=positive(float), default=60.0, help="seconds an MCP tool call may take"
    )
    s.add_argument("--ray", action="store_true", help="serve through Ray Serve on the cluster in RAY_ADDRESS")
    s.add_argument("--replicas", type=positive(int), help="engine replicas with --ray (default 1)")
    s.add_argument(
        "--ray-autoscaling",
        type=json_object,
        help='Serve\'s autoscaling_config as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4}\'',
    )
    s.add_argument(
        "--ray-actor-options",
        type=json_object,
        default={},
        help="Serve's ray_actor_options per replica as JSON, e.g. '{\"num_cpus\": 8}' (cuda: 1 GPU each)",
    )
    for module in FEATURE_COMMANDS:
        importlib.import_module(module).register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        if getattr(args, "model", None):  # a Hub id becomes its local snapshot (or GGUF file) once, here
            from levante.weights.hub import resolve

            given, args.model = args.model, str(resolve(args.model, args.revision))
            if args.model != given and getattr(args, "served_model_name", "") is None:
                args.served_model_name = given  # clients name it as the user did, as vLLM does
        if getattr(args, "quantization_group_size", None):  # one scheme name from here on: int4-g64
            if args.quantization != "int4":
                raise LevanteError("--quantization-group-size applies to --quantization int4 only")
            args.quantization = f"int4-g{args.quantization_group_size}"
        args.func(args)
    except LevanteError as e:
        print(f"levante: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
