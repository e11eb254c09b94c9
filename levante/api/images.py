"""Images in chat messages, checked before anything decodes them for the model.

Every `image_url` becomes a verified `data:` URL before the tokenizer (mistral-common for Mistral
models) sees it: base64 is decoded strictly, bytes and pixel counts are capped (a decompression
bomb is refused from its header, before its pixels are decoded), only PNG, JPEG, WebP and GIF
(first frame) pass, and http(s) URLs are fetched only from domains the operator allowed —
never by default, so a request cannot make the server reach its own network (SSRF)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image

from levante.api.errors import APIError, bad_request

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF"})


@dataclass(frozen=True)
class ImagePolicy:
    max_images: int = 10  # per request (--limit-mm-per-prompt)
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_domains: frozenset[str] = frozenset()  # --allowed-media-domains; empty: no fetching
    fetch_timeout: float = 10.0

    def allows(self, host: str) -> bool:
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead off the allowed domains; refuse it instead of following."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(url, timeout=policy.fetch_timeout) as resp:
            data = resp.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise bad_request(f"{where}: fetching the image failed with HTTP {e.code}", where) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"{where}: the image could not be fetched ({e})", where) from None
    return data


def _decode_data_url(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"{where}: a data URL must look like data:image/png;base64,<data>", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL is not valid base64", where) from None


def verify(data: bytes, policy: ImagePolicy, where: str) -> str:
    """Checks one image's bytes and returns them as a data URL of a format the tokenizer reads."""
    if len(data) > policy.max_bytes:
        raise APIError(
            413, f"{where}: the image is over {policy.max_bytes} bytes", param=where, code="image_too_large"
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise bad_request(
                    f"{where}: {img.format} images are not accepted (PNG, JPEG, WebP, GIF)", where
                )
            w, h = img.size
            if w * h > policy.max_pixels:
                raise bad_request(f"{where}: {w}x{h} pixels is over the limit of {policy.max_pixels}", where)
            img.load()  # decodes the (first) frame: a truncated or corrupt file fails here
            if img.format == "GIF":  # the tokenizer gets the first frame as a still image
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                data, fmt = buf.getvalue(), "png"
            else:
                fmt = img.format.lower()
    except APIError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{where}: not a readable image ({e})", where) from None
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


async def resolve(url: str, policy: ImagePolicy, where: str) -> str:
    if url.startswith("data:"):
        data = _decode_data_url(url, where)
    else:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise bad_request(f"{where}: only data: URLs and allowed http(s) URLs are accepted", where)
        if not policy.allows(parsed.hostname or ""):
            hint = " (see --allowed-media-domains)" if not policy.allowed_domains else ""
            raise bad_request(
                f"{where}: fetching images from {parsed.hostname!r} is not allowed{hint}", where
            )
        data = await asyncio.to_thread(_fetch, url, policy, where)
    return await asyncio.to_thread(verify, data, policy, where)


async def resolve_messages(messages: list[dict[str, Any]], policy: ImagePolicy) -> list[dict[str, Any]]:
    """The messages with every image URL replaced by its verified data URL."""
    count = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    )
    if count > policy.max_images:
        raise bad_request(
            f"messages: {count} images, but at most {policy.max_images} are accepted per request "
            "(--limit-mm-per-prompt)",
            "messages",
        )
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    where = f"messages[{i}].content[{j}].image_url.url"
                    url = await resolve(part["image_url"]["url"], policy, where)
                    part = {"type": "image_url", "image_url": {"url": url}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out
