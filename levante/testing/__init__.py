"""Synthetic tiny checkpoints and tokenizer files in the real formats, for tests and smoke runs.
Their weights are random: they prove that files load and code paths agree, not that answers
are good."""

from __future__ import annotations

from pathlib import Path

from levante.testing.checkpoints import TinySpec, random_weights, write_hf
from levante.testing.tekken import write_tekken


def write_model_dir(directory: Path, spec: TinySpec, seed: int = 0) -> Path:
    """A complete synthetic Mistral model directory: HF weights plus the synthetic tekken.json."""
    write_hf(directory, random_weights(spec, seed), spec)
    write_tekken(directory)
    return directory
