"""Opening a checkpoint: decide which file set a path holds, read its config, and hand out its
tensors under the model's parameter names with q/k rows already in rotate-half order."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from levante.config import Layout, ModelConfig, from_hf, from_params, with_mmproj
from levante.errors import CheckpointError
from levante.model.quantized import QuantizedTensor
from levante.weights.gguf_file import GGUFFile
from levante.weights.names import LM_HEAD, internal_name
from levante.weights.rotary import rotary_heads, to_rotate_half
from levante.weights.safetensors_files import SafetensorsFiles

log = logging.getLogger("levante.weights")

LAYOUT_NAMES: dict[Layout, str] = {"hf": "HF", "mistral": "Mistral-native", "gguf": "GGUF"}


class TensorSource(Protocol):
    """Tensors as the files name and store them."""

    def files(self) -> tuple[Path, ...]: ...
    def names(self) -> list[str]: ...
    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor | QuantizedTensor]]: ...


@dataclass(frozen=True)
class Joined:
    """Several files' tensors as one source: a GGUF text model and its mmproj file."""

    parts: tuple[TensorSource, ...]

    def files(self) -> tuple[Path, ...]:
        return tuple(f for part in self.parts for f in part.files())

    def names(self) -> list[str]:
        return [n for part in self.parts for n in part.names()]

    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor | QuantizedTensor]]:
        for part in self.parts:
            yield from part


@dataclass(frozen=True)
class TensorEntry:
    """One tensor ready for the model, with where it came from for error messages."""

    name: str  # the model parameter it feeds
    source: str  # its name in the file
    file: Path
    tensor: torch.Tensor | QuantizedTensor  # the latter only from a GGUF opened keep_quantized


@dataclass(frozen=True)
class Checkpoint:
    """One opened checkpoint: its config is read, its tensors are read only when iterated."""

    path: Path
    config: ModelConfig
    source: TensorSource

    def __len__(self) -> int:
        return len(self.source.names())

    def describe(self) -> str:
        t, v = self.config.text, self.config.vision
        files = ", ".join(f.name for f in self.source.files())
        text = (
            f"{t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads} heads ({t.num_kv_heads} kv) "
            f"of {t.head_dim}, vocab {t.vocab_size}"
        )
        vision = f"; vision {v.num_layers} layers, hidden {v.hidden_size}" if v else ""
        return (
            f"{LAYOUT_NAMES[self.config.layout]} {self.config.architecture} at {self.path} "
            f"({len(self)} tensors in {files}): {text}{vision}"
        )

    def entries(self) -> Iterator[TensorEntry]:
        """Every tensor, read when reached, under its model name; raises on names no rule knows."""
        layout = self.config.layout
        for source, file, tensor in self.source:
            name = internal_name(layout, source)
            if name is None:
                raise CheckpointError(
                    f"{file}: unknown tensor {source!r} for the {LAYOUT_NAMES[layout]} layout"
                )
            heads = rotary_heads(name, self.config) if layout != "hf" else None
            if heads:
                if tensor.shape[0] % (2 * heads):
                    raise CheckpointError(
                        f"{file}: tensor {source!r} of shape {tuple(tensor.shape)} does not split into "
                        f"{heads} heads of even size"
                    )
                if isinstance(tensor, QuantizedTensor):  # rows are whole blocks: permute them as they are
                    tensor = tensor.with_blocks(to_rotate_half(tensor.blocks, heads))
                else:
                    tensor = to_rotate_half(tensor, heads)
            yield TensorEntry(name, source, file, tensor)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(model parameter name, tensor), one at a time."""
        for entry in self.entries():
            yield entry.name, entry.tensor


def _choose_layout(directory: Path) -> tuple[Layout, str]:
    """A directory may hold both sets (HF shards and consolidated.safetensors); load one only."""
    params, config = (directory / "params.json").is_file(), (directory / "config.json").is_file()
    if params and config:
        hf_weights = any(
            (directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if (directory / "consolidated.safetensors").is_file() or not hf_weights:
            return (
                "mistral",
                "params.json and config.json are both present; Mistral-native is the reference format",
            )
        return "hf", "params.json is present but consolidated.safetensors is not"
    if params:
        return "mistral", "params.json is present, config.json is not"
    if config:
        return "hf", "config.json is present, params.json is not"
    raise CheckpointError(f"{directory}: neither config.json (HF) nor params.json (Mistral-native) found")


def _tie_as_the_files_say(config: ModelConfig, source: TensorSource, path: Path) -> ModelConfig:
    """The LM head is tied exactly when the files hold no lm_head tensor, as for GGUF and in
    transformers 5. Config flags are not reliable here: transformers 5 writes Mistral3's
    top-level flag (default true) while transformers 4 read the text_config's (default false)."""
    tied = all(internal_name(config.layout, name) != LM_HEAD for name in source.names())
    if tied == config.text.tie_word_embeddings:
        return config
    log.info(
        "%s: the config says tie_word_embeddings=%s but the files have %s lm_head tensor; going by the files",
        path,
        not tied,
        "no" if tied else "an",
    )
    return replace(config, text=replace(config.text, tie_word_embeddings=tied))


def _open_directory(path: Path) -> tuple[ModelConfig, TensorSource]:
    layout, reason = _choose_layout(path)
    log.info("%s: loading the %s weights (%s)", path, LAYOUT_NAMES[layout], reason)
    if layout == "mistral":
        return from_params(path / "params.json"), SafetensorsFiles.single(path / "consolidated.safetensors")
    index = path / "model.safetensors.index.json"
    files = (
        SafetensorsFiles.sharded(index)
        if index.is_file()
        else SafetensorsFiles.single(path / "model.safetensors")
    )
    return from_hf(path / "config.json"), files


def open_checkpoint(
    path: str | os.PathLike[str], keep_quantized: bool = False, mmproj: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """A model directory (HF and/or Mistral-native) or a .gguf file: its config now, its
    tensors on demand. Every file header is checked here, before any tensor is read. With
    `keep_quantized`, a GGUF's quantized matrices come as `QuantizedTensor`s. `mmproj` adds the
    vision tower and projector of llama.cpp's mmproj file to a GGUF text model."""
    path = Path(path)
    source: TensorSource
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if mmproj is not None:
        return _with_mmproj(path, Path(mmproj), keep_quantized)
    if path.is_dir():
        config, source = _open_directory(path)
    elif path.suffix == ".gguf":
        gguf = GGUFFile(path, keep_quantized)
        config, source = gguf.config, gguf
    else:
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    return Checkpoint(path, _tie_as_the_files_say(config, source, path), source)


def _with_mmproj(path: Path, mmproj: Path, keep_quantized: bool) -> Checkpoint:
    if path.suffix != ".gguf":
        raise CheckpointError(f"--mmproj {mmproj}: goes with a .gguf model, not {path}")
    if not mmproj.is_file():
        raise CheckpointError(f"--mmproj {mmproj}: no such file")
    text = GGUFFile(path, keep_quantized)
    vision = GGUFFile(mmproj, keep_quantized, model=False)
    config = with_mmproj(text.config, vision.metadata, set(vision.names()), str(mmproj))
    tokens = text.metadata.get("tokenizer.ggml.tokens") or []
    if "[IMG]" in tokens:  # the image placeholder's id in this vocabulary (10 in Mistral's)
        config = replace(config, image_token_id=tokens.index("[IMG]"))
    source = Joined((text, vision))
    return Checkpoint(path, _tie_as_the_files_say(config, source, path), source)
