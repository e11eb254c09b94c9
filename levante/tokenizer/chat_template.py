"""Jinja chat templates rendered the way transformers renders them, so a model's template gives
the prompt it was trained on. Templates come from downloaded files, so they run sandboxed."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from levante.errors import TokenizerError


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes `<>&'`; templates expect plain `json.dumps`."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template; a syntax error is the model files' fault, reported as such."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def render(
    source: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    variables: dict[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened (unless not asked).
    Keys whose value is None are dropped first (OpenAI sends `content: null` with tool calls;
    templates test presence)."""
    cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(
            messages=cleaned,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # user data the template cannot handle
        raise TokenizerError(f"chat template rejected the conversation: {e}") from None
