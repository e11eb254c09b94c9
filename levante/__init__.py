"""Levante: self-hosted serving for Mistral Small 3.2.

`levante.LLM`, `levante.SamplingParams` and friends are imported on first use, so that the CLI
can parse its arguments without importing torch."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "AsyncEngine", "Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import levante.engine

        return getattr(levante.engine, name)
    raise AttributeError(f"module 'levante' has no attribute {name!r}")
