"""The `levante` command."""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from levante.errors import LevanteError

if TYPE_CHECKING:
    from levante.engine import LLM, SamplingParams


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


def make_llm(args: argparse.Namespace) -> LLM:
    from levante.engine import LLM, EngineConfig
    from levante.engine.sampling_params import LOOP_GUARD_ON

    config = EngineConfig(  # one user at a time: the cache needs one sequence's worth
        max_num_seqs=1,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        loop_guard=LOOP_GUARD_ON if args.loop_guard else None,
    )
    return LLM(args.model, dtype=args.dtype, device=args.device, engine=config)


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


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or .gguf file (default: the SmolLM2 demo model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-memory", type=float, help="GiB for the KV cache (default: measured)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--loop-guard", action="store_true", help="stop answers whose tail keeps repeating")
    p.add_argument(
        "--no-system-prompt",
        action="store_true",
        help="do not add the model's SYSTEM_PROMPT.txt when the conversation has no system message",
    )


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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        args.func(args)
    except LevanteError as e:
        print(f"levante: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
