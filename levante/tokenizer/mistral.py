"""Mistral models: Tekken through mistral-common, which owns the prompt format (system prompt,
tools, tool calls and results, images). We only convert OpenAI payloads and translate errors."""

from __future__ import annotations

import datetime
from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from levante.errors import TokenizerError
from levante.tokenizer.base import Message, PromptInputs, Tokenizer, ToolSpec, check_chat

TOKENIZER_FILE = "tekken.json"
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
# Remote images are fetched by mistral-common; anything else (file://) would read the server's disk.
_IMAGE_SCHEMES = ("data:", "http://", "https://")


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

    def encode_chat(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> PromptInputs:
        messages = check_chat(messages, tools)
        for url in _image_urls(messages):
            if not url.startswith(_IMAGE_SCHEMES):
                raise TokenizerError(
                    f"image URL {url[:40]!r}: only data:, http:// and https:// URLs are accepted"
                )
        system = self.system_prompt()
        if system is not None and not any(m["role"] in ("system", "developer") for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            request = ChatCompletionRequest.from_openai(messages, tools, model=self._name)
            tokenized = self._mistral.encode_chat_completion(request)
        except (MistralCommonException, ValueError, KeyError, TypeError, OSError) as e:
            raise TokenizerError(f"cannot encode the conversation: {_error_text(e)}") from None
        return PromptInputs(tokens=tokenized.tokens, images=list(tokenized.images))

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return self._tekken.encode(text, bos=add_bos, eos=False)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        return self._tekken.decode(ids, special_token_policy=policy)

    def is_special(self, token_id: int) -> bool:
        return self._tekken.is_special(token_id)
