"""Continuous batching over a paged KV cache, with prefix caching, chunked prefill and a loop guard."""

from levante.engine.async_engine import AsyncEngine
from levante.engine.engine import Engine, EngineConfig, Output, RequestError
from levante.engine.llm import LLM, CompletionOutput, RequestOutput
from levante.engine.sampling_params import RepetitionDetection, SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "Output",
    "RepetitionDetection",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
