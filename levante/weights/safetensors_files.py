"""Safetensors checkpoints (one file, or shards listed in an index), read one tensor at a time
so loading never holds more than the model plus one tensor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from levante.config import read_json
from levante.errors import CheckpointError


def _header_keys(file: Path) -> tuple[str, ...]:
    """Every tensor name in the file. safetensors checks the header and that the data covers
    it, so a truncated or corrupt file fails here, before anything is loaded."""
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        with safe_open(file, framework="pt") as f:
            return tuple(f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None


@dataclass(frozen=True)
class SafetensorsFiles:
    """Which tensors each file holds, checked before any tensor is read."""

    keys: dict[Path, tuple[str, ...]]

    @classmethod
    def single(cls, file: Path) -> SafetensorsFiles:
        return cls({file: _header_keys(file)})

    @classmethod
    def sharded(cls, index: Path) -> SafetensorsFiles:
        """Shards named by `index` (`model.safetensors.index.json`): every file it lists must
        exist and hold the tensors it claims, and no shard may hold tensors it does not list."""
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' object")
        listed: dict[Path, set[str]] = {}
        for name, shard in weight_map.items():
            listed.setdefault(index.parent / str(shard), set()).add(name)
        keys = {}
        for file, names in sorted(listed.items()):
            if not file.is_file():
                raise CheckpointError(f"{file}: file not found (listed in {index.name})")
            keys[file] = _header_keys(file)
            if set(keys[file]) != names:
                absent = sorted(names - set(keys[file]))
                unlisted = sorted(set(keys[file]) - names)
                raise CheckpointError(
                    f"{file}: does not match {index.name} (missing {absent[:3]}, unlisted {unlisted[:3]})"
                )
        return cls(keys)

    def files(self) -> tuple[Path, ...]:
        return tuple(self.keys)

    def names(self) -> list[str]:
        return [name for names in self.keys.values() for name in names]

    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor]]:
        """(name in the file, file, tensor as stored)."""
        for file, names in self.keys.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, file, f.get_tensor(name)
