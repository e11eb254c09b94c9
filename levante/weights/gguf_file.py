"""GGUF files (llama.cpp): the metadata gives the ModelConfig. Quantized matrices stay in their
blocks where Levante's kernels can compute with them (`keep_quantized`); every other tensor, and
all of them without those kernels, is dequantized to float32 one at a time by gguf's reference code."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from levante.config import ModelConfig, from_gguf_fields
from levante.errors import CheckpointError
from levante.model.quantized import BLOCKS, QuantizedTensor

_T = GGMLQuantizationType
# What llama.cpp's files hold that Levante has elsewhere: the mmproj's copy of the [IMG_BREAK]
# embedding (the text model's own row is used)
UNUSED = frozenset({"v.token_embd.img_break", "v.token_embd.img_break.weight"})
# The types the tests check against gguf's reference dequantization; others fail up front.
SUPPORTED_TYPES = frozenset({_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q5_K, _T.Q6_K})


@dataclass(frozen=True)
class GGUFContents:
    tensors: list[ReaderTensor]  # views into the memory-mapped file
    metadata: dict[str, Any]  # every field as plain Python values


def read_gguf(path: Path) -> GGUFContents:
    """Parsing a GGUF file takes seconds (most of it the vocabulary), and the weights and the
    tokenizer both need it: the last two files parsed are kept, keyed by their size and mtime. Raises
    what gguf raises on a bad file (OSError, ValueError, IndexError, KeyError)."""
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)  # a model and its mmproj
def _parse(path: Path, mtime_ns: int, size: int) -> GGUFContents:
    # Only plain values are kept: the reader's parsed fields (the vocabulary and merges as numpy
    # arrays) would otherwise add ~150 MiB to the demo model's peak.
    reader = GGUFReader(path)
    return GGUFContents(reader.tensors, {key: field.contents() for key, field in reader.fields.items()})


def _mapped(data: np.ndarray) -> torch.Tensor:
    """The blocks as a tensor over the memory-mapped file itself, as llama.cpp maps its weights:
    no copy, pages read on first use and shared with the page cache. Nothing writes to weights,
    so the mapping being read-only (which torch warns about) does not matter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data)


class GGUFFile:
    """An opened GGUF file whose every tensor has been checked to be present and of a
    supported type; `config` comes from its metadata."""

    def __init__(self, path: Path, keep_quantized: bool = False, *, model: bool = True) -> None:
        """`model`: the file describes a model (its config is read); an mmproj file does not."""
        try:
            # The reader memory-maps the file and slices each tensor out of it: a truncated
            # file fails here, on the first tensor that runs past the end.
            contents = read_gguf(path)
        except (ValueError, IndexError, KeyError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid GGUF file ({e})") from None
        self.path, self.keep_quantized = path, keep_quantized
        self._tensors = contents.tensors
        for t in self._tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
                raise CheckpointError(
                    f"{path}: tensor {t.name} is {t.tensor_type.name}, which is not supported ({supported})"
                )
        self.metadata = contents.metadata
        if model:
            self.config: ModelConfig = from_gguf_fields(contents.metadata, set(self.names()), str(path))

    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    def names(self) -> list[str]:
        return [t.name for t in self._tensors if t.name not in UNUSED]

    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor | QuantizedTensor]]:
        """(name in the file, file, tensor in PyTorch's row-major shape): float32, or the file's own
        blocks (a view of the mapping, see `_mapped`) for a matrix of a type the kernels read."""
        for t in self._tensors:
            if t.name in UNUSED:
                continue
            if self.keep_quantized and t.tensor_type in BLOCKS and len(t.shape) == 2:
                yield t.name, self.path, QuantizedTensor(_mapped(t.data), int(t.tensor_type), int(t.shape[0]))
                continue
            # F32 dequantizes to a read-only view of the mapped file: copy it (only then).
            values = np.require(dequantize(t.data, t.tensor_type), requirements=["C", "W"])
            yield t.name, self.path, torch.from_numpy(values)
