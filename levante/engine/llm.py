"""Offline batch generation: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from levante.distributed import tensor_parallel
from levante.engine.engine import Engine, EngineConfig, Output
from levante.engine.sampler import Sample
from levante.engine.sampling_params import SamplingParams
from levante.loader import load
from levante.tokenizer import PromptInputs, Tokenizer

Prompt = str | list[dict[str, Any]] | PromptInputs  # raw text, a chat conversation, or token ids


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Sample] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: Output) -> None:
        """Folds one step's delta into the running result."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0
    prompt_logprobs: list[Sample | None] | None = None  # when SamplingParams.prompt_logprobs is set


def to_inputs(tokenizer: Tokenizer, prompt: Prompt) -> PromptInputs:
    if isinstance(prompt, PromptInputs):
        return prompt
    if isinstance(prompt, str):
        return PromptInputs(tokens=tokenizer.encode(prompt, add_bos=tokenizer.adds_bos), images=[])
    return tokenizer.encode_chat(prompt)


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        engine: EngineConfig | None = None,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        mmproj: str | Path | None = None,
        tokenizer: str | Path | None = None,
        quantized: bool = True,
    ) -> None:
        """`tensor_parallel_size` > 1 shards the model over that many processes: this one (rank 0)
        and workers it spawns (or torchrun's, which never return from here). `quantized=False`
        dequantizes a GGUF's blocks at load: float numbers, at two to four times the memory."""
        engine = engine or EngineConfig()
        name, vision = (None if p is None else str(p) for p in (model, mmproj))
        spec = tensor_parallel.WorkerSpec(name, dtype, device, engine, quantization, vision, quantized)
        tensor_parallel.start(tensor_parallel_size, spec)
        loaded = load(
            model,
            dtype=dtype,
            device=device,
            progress=False,
            quantization=quantization,
            quantized=quantized,
            mmproj=mmproj,
            tokenizer=tokenizer,
        )
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(loaded.model, loaded.tokenizer, engine)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion with continuous batching; results in input order."""
        single = isinstance(prompts, str | PromptInputs) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict)
        )
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(batch)
        if len(plist) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(plist)} sampling params")
        results: dict[str, RequestOutput] = {}
        for i, (prompt, p) in enumerate(zip(batch, plist, strict=True)):
            inputs = to_inputs(self.tokenizer, prompt)
            rid = f"offline-{id(self)}-{i}"
            self.engine.add_request(rid, inputs, p)
            results[rid] = RequestOutput(rid, list(inputs.tokens), [CompletionOutput(k) for k in range(p.n)])
        bar = tqdm(total=len(batch), disable=not use_tqdm, unit="req")
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                results[delta.request_id].outputs[delta.index].add(delta)
                results[delta.request_id].cached_tokens = delta.cached_tokens
                if delta.prompt_logprobs is not None:
                    results[delta.request_id].prompt_logprobs = delta.prompt_logprobs
                if delta.finished and all(o.finish_reason for o in results[delta.request_id].outputs):
                    bar.update(1)
        bar.close()
        return list(results.values())

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request as the engine produces them (the terminal chat's path)."""
        rid = f"stream-{uuid.uuid4().hex}"
        self.engine.add_request(rid, to_inputs(self.tokenizer, prompt), params or SamplingParams())
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        yield delta.text
                        if delta.finished:
                            return
        finally:
            self.engine.abort(rid)  # a no-op once finished; frees the blocks on Ctrl-C
