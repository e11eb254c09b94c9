"""Tokenizers behind one interface: Mistral models through mistral-common (`tekken.json`), other
models through HF `tokenizers` with their chat template (`tokenizer.json` or GGUF metadata)."""

from __future__ import annotations

from pathlib import Path

from levante.errors import TokenizerError
from levante.tokenizer.base import PromptInputs, Tokenizer
from levante.tokenizer.detokenizer import IncrementalDetokenizer

__all__ = ["IncrementalDetokenizer", "PromptInputs", "Tokenizer", "load_tokenizer"]


def load_tokenizer(path: Path | str, *, default_system_prompt: bool = True) -> Tokenizer:
    """The tokenizer for a model directory or a `.gguf` file. `tekken.json` wins over
    `tokenizer.json` when a directory has both: mistral-common is the reference for Mistral
    prompts. `default_system_prompt` applies to Mistral directories with `SYSTEM_PROMPT.txt`."""
    # Backends import their libraries lazily so loading one kind never pays for the other.
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from levante.tokenizer.gguf_vocab import load_gguf

        return load_gguf(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a model directory or a .gguf file")
    if (path / "tekken.json").is_file():
        from levante.tokenizer.mistral import MistralBackend

        return MistralBackend(path, default_system_prompt=default_system_prompt)
    if (path / "tokenizer.json").is_file():
        from levante.tokenizer.hf import load_hf_directory

        return load_hf_directory(path)
    raise TokenizerError(f"{path}: no tokenizer found (expected tekken.json or tokenizer.json)")
