"""GGUF files (llama.cpp): the metadata gives the ModelConfig; tensors are dequantized to float32
one at a time by gguf's reference code, so no quantized kernels are needed to load them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from levante.config import ModelConfig, from_gguf_fields
from levante.errors import CheckpointError

_T = GGMLQuantizationType
# The types the tests check against gguf's reference dequantization; others fail up front.
SUPPORTED_TYPES = frozenset({_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q5_K, _T.Q6_K})


class GGUFFile:
    """An opened GGUF file whose every tensor has been checked to be present and of a
    supported type; `config` comes from its metadata."""

    def __init__(self, path: Path) -> None:
        try:
            # The reader memory-maps the file and slices each tensor out of it: a truncated
            # file fails here, on the first tensor that runs past the end.
            reader = GGUFReader(path)
        except (ValueError, IndexError, KeyError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid GGUF file ({e})") from None
        self.path = path
        # Only the tensors are kept: the reader's parsed metadata (the tokenizer's vocabulary and
        # merges as numpy arrays) would otherwise add ~150 MiB to the demo model's peak.
        self._tensors = reader.tensors
        for t in self._tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
                raise CheckpointError(
                    f"{path}: tensor {t.name} is {t.tensor_type.name}, which is not supported ({supported})"
                )
        fields = {key: field.contents() for key, field in reader.fields.items()}
        self.config: ModelConfig = from_gguf_fields(fields, set(self.names()), str(path))

    def files(self) -> tuple[Path, ...]:
        return (self.path,)

    def names(self) -> list[str]:
        return [t.name for t in self._tensors]

    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor]]:
        """(name in the file, file, float32 tensor in PyTorch's row-major shape)."""
        for t in self._tensors:
            # F32 dequantizes to a read-only view of the mapped file: copy it (only then).
            values = np.require(dequantize(t.data, t.tensor_type), requirements=["C", "W"])
            yield t.name, self.path, torch.from_numpy(values)
