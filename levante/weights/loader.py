"""Filling a model built on the meta device with a checkpoint's tensors, one at a time: each
parameter is replaced by its loaded tensor, so peak memory stays near the model's own size. A
quantized tensor replaces the Linear or Embedding that owns it by its quantized counterpart."""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn
from tqdm import tqdm

from levante.errors import CheckpointError
from levante.model.quantized import QuantEmbedding, QuantizedTensor, QuantLinear
from levante.weights.checkpoint import Checkpoint, open_checkpoint
from levante.weights.names import EMBED, LM_HEAD


def _replace(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module), attr, value)


def _place(
    model: nn.Module, name: str, tensor: QuantizedTensor, dtype: torch.dtype, device: torch.device | str
) -> None:
    """A quantized weight takes over its module where one exists for it, else is dequantized."""
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path)
    parent, _, child = path.rpartition(".")
    if attr == "weight" and type(owner) is nn.Linear and owner.bias is None:
        setattr(model.get_submodule(parent), child, QuantLinear(tensor))
    elif attr == "weight" and type(owner) is nn.Embedding:
        setattr(model.get_submodule(parent), child, QuantEmbedding(tensor, dtype))
    else:
        _replace(model, name, nn.Parameter(tensor.dequantize(dtype).to(device), requires_grad=False))


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint | str | os.PathLike[str],
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = True,
    transform: Callable[[str, torch.Tensor], torch.Tensor | QuantizedTensor] | None = None,
) -> None:
    """Every model parameter gets exactly one checkpoint tensor of its shape, converted to
    `dtype` on `device`; unknown, duplicate, misshapen and missing tensors are errors. `transform`
    (name, float tensor) may hand back another value to load instead (`quantized.quantizer`)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    expected = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    entries = tqdm(
        checkpoint.entries(),
        total=len(checkpoint),
        desc=f"Loading {checkpoint.path.name}",
        unit="tensor",
        disable=not progress,
    )
    for entry in entries:
        where = f"{entry.file}: tensor {entry.source!r}"
        param = expected.get(entry.name)
        if param is None:
            raise CheckpointError(
                f"{where} ({entry.name}) has no place in the {checkpoint.config.architecture} model"
            )
        if entry.name in loaded:
            raise CheckpointError(f"{where} loads {entry.name} a second time")
        if entry.tensor.shape != param.shape:
            raise CheckpointError(
                f"{where} has shape {tuple(entry.tensor.shape)}, the model expects {tuple(param.shape)}"
            )
        tensor = entry.tensor
        if transform is not None and not isinstance(tensor, QuantizedTensor):
            tensor = transform(entry.name, tensor)
        if isinstance(tensor, QuantizedTensor):
            _place(model, entry.name, tensor, dtype, device)
        else:
            value = tensor.to(device=device, dtype=dtype)
            _replace(model, entry.name, nn.Parameter(value, requires_grad=False))
        loaded.add(entry.name)
    if checkpoint.config.text.tie_word_embeddings and LM_HEAD in expected:
        embed = model.get_submodule(EMBED.rpartition(".")[0])
        if isinstance(embed, QuantEmbedding):
            head = LM_HEAD.rpartition(".")[0].rpartition(".")
            setattr(model.get_submodule(head[0]), head[2], QuantLinear(embed.weight))
        else:
            _replace(model, LM_HEAD, model.get_parameter(EMBED))
    missing = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{checkpoint.path}: no tensor for {shown}")
