"""The one tokenizer interface the engine and the API use, whichever backend sits behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from levante.errors import TokenizerError
from levante.tokenizer.detokenizer import IncrementalDetokenizer

# OpenAI chat-format dicts, passed through as the client sent them.
Message = dict[str, Any]
ToolSpec = dict[str, Any]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


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

    @abstractmethod
    def encode_chat(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> PromptInputs:
        """OpenAI chat messages (and tools) → a prompt that ends ready for the assistant's answer."""

    @abstractmethod
    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Plain text → ids; special-token text is not given special treatment beyond the backend's own."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids → text; malformed UTF-8 becomes U+FFFD rather than an error."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Control tokens (BOS, EOS, `[INST]`, …) that are not text."""

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
