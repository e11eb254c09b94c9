"""The one tokenizer interface the engine and the API use, whichever backend sits behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import llguidance as llg
import numpy as np

from levante.errors import TokenizerError
from levante.tokenizer.detokenizer import IncrementalDetokenizer

# OpenAI chat-format dicts, passed through as the client sent them.
Message = dict[str, Any]
ToolSpec = dict[str, Any]

ToolChoice = str | dict[str, Any]  # "none" | "auto" | "required" | {"type": "function", "function": {...}}

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ToolCallTokens:
    """Control tokens of the model's tool-call format: v11 writes `[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}`
    (the `[CALL_ID]` part optional), earlier versions `[TOOL_CALLS][{"name": …, "arguments": …}]`."""

    calls: int
    args: int | None
    call_id: int | None


@dataclass
class PromptInputs:
    """What the model consumes for one prompt: token ids, and the images their `[IMG]` runs stand
    for, in order of appearance, each (C, H, W) float32 already normalized."""

    tokens: list[int]
    images: list[np.ndarray] = field(default_factory=list)


class Tokenizer(ABC):
    """Chat encoding, plain encoding and decoding for one model. Backends fill the attributes
    below in their constructor."""

    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    adds_bos: bool  # the model's convention for plain-text prompts (completions, `encode`)
    vocab_size: int
    image_token_id: int | None
    tool_call_tokens: ToolCallTokens | None  # None: the model has no tool-call format

    @abstractmethod
    def encode_chat(
        self,
        messages: list[Message],
        tools: list[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> PromptInputs:
        """OpenAI chat messages (and tools) → a prompt that ends ready for the assistant's answer;
        vLLM's `continue_final_message`: one that ends inside the final (assistant) message, for
        the model to go on with it; `add_generation_prompt=False`: the assistant's turn not opened."""

    @abstractmethod
    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Plain text → ids; special-token text is not given special treatment beyond the backend's own."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids → text; malformed UTF-8 becomes U+FFFD rather than an error."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Control tokens (BOS, EOS, `[INST]`, …) that are not text."""

    @abstractmethod
    def guidance_tokenizer(self) -> llg.LLTokenizer:
        """The vocabulary as llguidance sees it, for grammar masks; takes ~0.5 s, so call it once."""

    @abstractmethod
    def grammar(
        self,
        tools: list[ToolSpec] | None,
        tool_choice: ToolChoice | None,
        parallel_tool_calls: bool,
        json_schema: dict[str, Any] | None,
    ) -> str | None:
        """The llguidance grammar an answer must follow: tool calls in the model's own format for
        `tools` under `tool_choice`, and/or a JSON document valid under `json_schema`. Schemas are used
        as given (every tool is treated as strict). None: nothing to constrain. Raises TokenizerError
        for what this model's format cannot express."""

    def detokenizer(self, skip_special: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one generated sequence."""
        return IncrementalDetokenizer(self.decode, skip_special=skip_special)


def check_chat(messages: object, tools: object) -> list[Message]:
    """The structural checks both backends need before handing a request on, so that malformed
    requests fail with one clear line instead of an AttributeError deep inside a library."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            expected = ", ".join(sorted(ROLES))
            raise TokenizerError(f"messages[{i}]: unknown role {role!r} (expected one of {expected})")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise TokenizerError("tools must be a list of objects")
    return messages


def check_continuation(
    messages: list[Message], add_generation_prompt: bool, continue_final_message: bool
) -> None:
    """vLLM's rules for continuing the final message."""
    if continue_final_message and add_generation_prompt:
        raise TokenizerError("continue_final_message and add_generation_prompt cannot both be true")
    if continue_final_message and messages[-1].get("role") != "assistant":
        raise TokenizerError("continue_final_message needs the final message to be the assistant's")
