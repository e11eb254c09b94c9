"""Mistral models: Tekken through mistral-common, which owns the prompt format (system prompt,
tools, tool calls and results, images). We only convert OpenAI payloads and translate errors."""

from __future__ import annotations

import datetime
import hashlib
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import llguidance as llg
from mistral_common.exceptions import MistralCommonException
from mistral_common.guidance.grammar_factory import GrammarFactory
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from levante.errors import TokenizerError
from levante.tokenizer.base import (
    Message,
    PromptInputs,
    Tokenizer,
    ToolCallTokens,
    ToolChoice,
    ToolSpec,
    check_chat,
    check_continuation,
)

TOKENIZER_FILE = "tekken.json"
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
# Remote images are fetched by mistral-common; anything else (file://) would read the server's disk.
_IMAGE_SCHEMES = ("data:", "http://", "https://")
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def call_id(raw: str) -> str:
    """Mistral's tool-call ids are 9 alphanumerics; other clients' ids (OpenAI's `call_…`) are mapped
    to 9 by a hash, so a conversation keeps one id per call and encodes the same on every turn."""
    if _CALL_ID.fullmatch(raw):
        return raw
    n = int.from_bytes(hashlib.blake2b(raw.encode(), digest_size=8).digest())
    return "".join(_ALNUM[n // 62**i % 62] for i in range(9))


def _normalize_call_ids(messages: list[Message]) -> list[Message]:
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = [{**c, "id": call_id(c["id"])} if isinstance(c.get("id"), str) else c for c in calls]
            m = {**m, "tool_calls": fixed}
        if isinstance(m.get("tool_call_id"), str):
            m = {**m, "tool_call_id": call_id(m["tool_call_id"])}
        out.append(m)
    return out


def _image_urls(messages: list[Message]) -> list[str]:
    urls = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                urls.append(str(ref.get("url", "") if isinstance(ref, dict) else ref))
    return urls


def _error_text(e: Exception) -> str:
    """KeyError's own text is just the quoted key; say what it means."""
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


class MistralBackend(Tokenizer):
    """A model directory with `tekken.json` (any instruct version mistral-common knows) and
    optionally `SYSTEM_PROMPT.txt`, used as the system message when a conversation has none."""

    def __init__(self, directory: Path, *, default_system_prompt: bool = True) -> None:
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} in the model directory")
        try:
            # Serving mode: tool calls must all be answered before the conversation goes on.
            self._mistral = MistralTokenizer.from_file(path, mode=ValidationMode.serving)
        except (MistralCommonException, ValueError, KeyError, AssertionError) as e:
            raise TokenizerError(f"{path}: not a usable Tekken tokenizer ({_error_text(e)})") from None
        self._name = directory.resolve().name
        prompt_path = directory / SYSTEM_PROMPT_FILE
        self._system_template = (
            prompt_path.read_text(encoding="utf-8")
            if default_system_prompt and prompt_path.is_file()
            else None
        )
        self._tekken = self._mistral.instruct_tokenizer.tokenizer
        self.eos_token_ids = frozenset({self._tekken.eos_id})
        self.bos_token_id = self._tekken.bos_id
        self.adds_bos = True
        self.vocab_size = self._tekken.n_words
        has_images = self._mistral.instruct_tokenizer.image_encoder is not None
        self.image_token_id = self._tekken.get_special_token("[IMG]") if has_images else None
        v11 = self._tekken.version >= TokenizerVersion.v11
        self.tool_call_tokens = ToolCallTokens(
            calls=self._tekken.get_special_token("[TOOL_CALLS]"),
            args=self._tekken.get_special_token("[ARGS]") if v11 else None,
            call_id=self._tekken.get_special_token("[CALL_ID]") if v11 else None,
        )

    def system_prompt(self) -> str | None:
        """The default system message with its placeholders filled; dates are taken per call so a
        long-running server does not go stale."""
        if self._system_template is None:
            return None
        today = datetime.date.today()
        yesterday = today - datetime.timedelta(days=1)
        return (
            self._system_template.replace("{name}", self._name)
            .replace("{today}", today.isoformat())
            .replace("{yesterday}", yesterday.isoformat())
        )

    def encode_chat(
        self,
        messages: list[Message],
        tools: list[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> PromptInputs:
        """Mistral's format opens no assistant turn (the answer follows [/INST] directly), so
        `add_generation_prompt` changes nothing; `continue_final_message` is mistral-common's own."""
        messages = check_chat(messages, tools)
        check_continuation(messages, add_generation_prompt, continue_final_message)
        for url in _image_urls(messages):
            if not url.startswith(_IMAGE_SCHEMES):
                raise TokenizerError(
                    f"image URL {url[:40]!r}: only data:, http:// and https:// URLs are accepted"
                )
        messages = _normalize_call_ids(messages)
        system = self.system_prompt()
        if system is not None and not any(m["role"] in ("system", "developer") for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            request = ChatCompletionRequest.from_openai(
                messages, tools, continue_final_message=continue_final_message, model=self._name
            )
            tokenized = self._mistral.encode_chat_completion(request)
        except (MistralCommonException, ValueError, KeyError, TypeError, OSError) as e:
            raise TokenizerError(f"cannot encode the conversation: {_error_text(e)}") from None
        return PromptInputs(tokens=tokenized.tokens, images=list(tokenized.images))

    @cached_property
    def _grammar_factory(self) -> GrammarFactory:
        if not GrammarFactory.is_supported(self._mistral):
            raise TokenizerError(
                f"tool calls and structured output need a Tekken tokenizer >= v11 "
                f"(this one is {self._tekken.version.value})"
            )
        return GrammarFactory(self._mistral)

    def guidance_tokenizer(self) -> llg.LLTokenizer:
        return self._grammar_factory.llg_tokenizer

    def grammar(
        self,
        tools: list[ToolSpec] | None,
        tool_choice: ToolChoice | None,
        parallel_tool_calls: bool,
        json_schema: dict[str, Any] | None,
    ) -> str | None:
        """mistral-common's grammar for the request: it owns the tool-call format (and EOS placement)."""
        if not tools and json_schema is None:
            return None
        response_format: dict[str, Any] = {"type": "text"}
        if json_schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json_schema, "strict": True},
            }
        strict = [{**t, "function": {**t["function"], "strict": True}} for t in tools or []]
        factory = self._grammar_factory
        try:
            request = ChatCompletionRequest.from_openai(
                [],
                strict or None,
                tool_choice=tool_choice or "auto",
                parallel_tool_calls=parallel_tool_calls,
                response_format=response_format,
            )
            return factory.get_grammar_for_chat_request(request, factory.select_jinja_template())
        except (MistralCommonException, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(_error_text(e)) from None

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return self._tekken.encode(text, bos=add_bos, eos=False)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        return self._tekken.decode(ids, special_token_policy=policy)

    def is_special(self, token_id: int) -> bool:
        return self._tekken.is_special(token_id)
