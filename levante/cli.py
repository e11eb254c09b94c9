"""The `levante` command."""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from levante.errors import LevanteError


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


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from levante.loader import load
    from levante.reference import generate_tokens

    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(user_message(args.prompt, args.image))
    loaded = load(
        args.model, dtype=args.dtype, device=args.device, default_system_prompt=not args.no_system_prompt
    )
    prompt = loaded.tokenizer.encode_chat(messages)
    images = [torch.from_numpy(img).to(args.device) for img in prompt.images]
    detok = loaded.tokenizer.detokenizer()
    for token, _ in generate_tokens(
        loaded.model,
        prompt.tokens,
        images=images,
        max_tokens=args.max_tokens,
        stop_ids=loaded.tokenizer.eos_token_ids,
        temperature=args.temperature,
        seed=args.seed,
    ):
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or .gguf file (default: the SmolLM2 demo model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
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
    model_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable)")
    g.add_argument("--system", help="system message")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)
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
