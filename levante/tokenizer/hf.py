"""Other models (Llama family): a `tokenizers` tokenizer plus the model's Jinja chat template,
from a HF directory (`tokenizer.json`, `tokenizer_config.json`) or built from GGUF metadata
(see `levante.tokenizer.gguf_vocab`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import llguidance as llg
import tokenizers

from levante.config import read_json
from levante.errors import TokenizerError
from levante.tokenizer import chat_template
from levante.tokenizer.base import (
    Message,
    PromptInputs,
    Tokenizer,
    ToolChoice,
    ToolSpec,
    check_chat,
    check_continuation,
)

# The special-token names chat templates read (transformers passes its special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})


def _arguments(call: Any) -> Any:
    """OpenAI sends tool-call arguments as a JSON string; HF templates expect the object (they
    `tojson` it), so valid JSON objects are parsed, as vLLM does. Anything else passes as is."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        parsed = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": parsed}} if isinstance(parsed, dict) else call


def _for_template(messages: list[Message]) -> list[Message]:
    """Content-part lists become one string (text parts joined by newlines, as vLLM does) because
    text-only templates concatenate `content` as a string; images are refused outright."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _IMAGE_PARTS:
                    raise TokenizerError(f"messages[{i}]: this model's tokenizer has no image support")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise TokenizerError(f"messages[{i}]: unsupported content part {part!r:.80}")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        if isinstance(message.get("tool_calls"), list):
            message = {**message, "tool_calls": [_arguments(c) for c in message["tool_calls"]]}
        out.append(message)
    return out


class HFBackend(Tokenizer):
    """Encoding goes through the chat template; special tokens written by the template (or by the
    user) are matched whole, as transformers does."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        templates: dict[str, str],
        special_tokens: dict[str, str],
        eos_token_ids: Iterable[int],
        adds_bos: bool,
        where: str,
    ) -> None:
        self._tok = tokenizer
        self.adds_bos = adds_bos
        self._templates = templates
        self._special_tokens = special_tokens
        self._where = where
        self._special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        bos = special_tokens.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None
        self.eos_token_ids = frozenset(eos_token_ids)
        if not self.eos_token_ids:
            raise TokenizerError(f"{where}: no end-of-sequence token is defined")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.image_token_id = None
        self.tool_call_tokens = None

    def encode_chat(
        self,
        messages: list[Message],
        tools: list[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> PromptInputs:
        messages = _for_template(check_chat(messages, tools))
        check_continuation(messages, add_generation_prompt, continue_final_message)
        template = self._templates.get("tool_use") if tools else None
        template = template or self._templates.get("default")
        if template is None:
            raise TokenizerError(f"{self._where}: the model has no chat template")
        text = chat_template.render(template, messages, tools, self._special_tokens, add_generation_prompt)
        if continue_final_message:  # cut what the template puts after the final message's text (as vLLM)
            final = str(messages[-1].get("content") or "").strip()  # templates may trim it
            end = text.rfind(final) if final else -1
            if end < 0:
                raise TokenizerError(
                    "continue_final_message: the chat template does not show the final message's text"
                )
            text = text[: end + len(final)]
        return PromptInputs(tokens=self.encode(text, add_bos=False))

    def guidance_tokenizer(self) -> llg.LLTokenizer:
        return llg.LLTokenizer(self._tok.to_str(), eos_token=sorted(self.eos_token_ids))

    def grammar(
        self,
        tools: list[ToolSpec] | None,
        tool_choice: ToolChoice | None,
        parallel_tool_calls: bool,
        json_schema: dict[str, Any] | None,
    ) -> str | None:
        """JSON output only: a chat template says how to show tools, not how the model writes a
        call, and these models were not trained on a format we could hold them to."""
        if tools:
            raise TokenizerError(
                f"{self._where}: this model has no tool-call format; tools need a Mistral model "
                "(tekken.json). Use response_format for JSON output"
            )
        return None if json_schema is None else llg.LLMatcher.grammar_from_json_schema(json_schema)

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _read_json(path: Path) -> dict[str, Any]:
    """An optional tokenizer-side JSON file: {} when absent."""
    return read_json(path, TokenizerError) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _templates(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    """`chat_template.jinja` wins over the config's `chat_template`, which is one string or a list
    of named templates (`default`, `tool_use`)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t
        }
    return {}


def load_hf_directory(directory: Path) -> HFBackend:
    """`tokenizer.json` + `tokenizer_config.json`; EOS ids also from `generation_config.json`,
    which is where instruct models list their end-of-turn token."""
    path = directory / "tokenizer.json"
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for unreadable or malformed files
        raise TokenizerError(f"{path}: cannot load ({e})") from None
    config = _read_json(directory / "tokenizer_config.json")
    special = {name: text for name in TEMPLATE_TOKENS if (text := _token_text(config.get(name)))}
    eos: set[int] = set()
    if "eos_token" in special and (eos_id := tok.token_to_id(special["eos_token"])) is not None:
        eos.add(eos_id)
    generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
    eos.update([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])
    # transformers adds BOS to plain text when tokenizer_config says so, else when the
    # tokenizer.json post-processor does
    adds_bos = config.get("add_bos_token")
    if not isinstance(adds_bos, bool):
        bos = special.get("bos_token")
        adds_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [
            tok.token_to_id(bos)
        ]
    return HFBackend(
        tok,
        templates=_templates(directory, config),
        special_tokens=special,
        eos_token_ids=eos,
        adds_bos=adds_bos,
        where=str(directory),
    )
