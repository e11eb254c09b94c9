"""The operator's MCP server list, in the `mcpServers` file format Claude Desktop, Cursor and
llama.cpp share, so an existing file can be reused as is. Every mistake is reported with the file
and the JSON path at fault, before any server is started."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from levante.errors import LevanteError

_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class StdioServer:
    """A server we launch as a child process and talk to over its stdin/stdout. The child gets
    only a minimal environment plus `env` (the SDK's allow-list), so secrets must be passed here."""

    name: str
    command: str
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: Path | None


@dataclass(frozen=True)
class HttpServer:
    """A server already running somewhere, reached over Streamable HTTP with `headers` (e.g. an
    Authorization header) on every request."""

    name: str
    url: str
    headers: dict[str, str]


def load_config(path: Path) -> list[StdioServer | HttpServer]:
    """The servers in `path`, in file order. Keys other hosts use (`type`, `disabled`, ...) are
    ignored; a relative `cwd` is taken relative to the file, not to wherever levante was started."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LevanteError(f"{path}: cannot read the MCP config: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LevanteError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(data, dict) or "mcpServers" not in data:
        raise LevanteError(f'{path}: expected an object with an "mcpServers" object in it')
    servers = data["mcpServers"]
    if not isinstance(servers, dict):
        raise LevanteError(f"{path}: mcpServers must be an object mapping names to servers")
    return [_server(path, name, entry) for name, entry in servers.items()]


def _server(path: Path, name: str, entry: Any) -> StdioServer | HttpServer:
    where = f"mcpServers.{name}"
    if not _NAME.fullmatch(name):
        raise LevanteError(
            f"{path}: mcpServers.{json.dumps(name)}: a server name may only contain letters, digits, _ and -"
        )
    if not isinstance(entry, dict):
        raise LevanteError(f"{path}: {where} must be an object")
    if ("command" in entry) == ("url" in entry):
        raise LevanteError(f"{path}: {where} needs exactly one of command (local server) or url (remote one)")
    if "url" in entry:
        url = _string(path, f"{where}.url", entry["url"])
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LevanteError(f"{path}: {where}.url must be an http:// or https:// URL, not {url!r}")
        return HttpServer(name, url, _strings(path, f"{where}.headers", entry.get("headers", {})))
    command = _string(path, f"{where}.command", entry["command"])
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise LevanteError(f"{path}: {where}.args must be a list of strings")
    cwd = entry.get("cwd")
    return StdioServer(
        name,
        command,
        tuple(args),
        _strings(path, f"{where}.env", entry.get("env", {})),
        None if cwd is None else path.parent / _string(path, f"{where}.cwd", cwd),
    )


def _string(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise LevanteError(f"{path}: {where} must be a non-empty string")
    return value


def _strings(path: Path, where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise LevanteError(f"{path}: {where} must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise LevanteError(f"{path}: {where}.{key} must be a string")
    return dict(value)
