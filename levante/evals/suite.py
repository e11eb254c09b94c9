"""What an eval suite is: it loads its items, runs one item against an OpenAI-compatible endpoint
and scores it, and sums the scores up. Everything else — concurrency, the resumable cache, the
progress bar, the results file and the report — is the runner's, so a suite stays about its
benchmark's own rules."""

from __future__ import annotations

import functools
import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from levante.errors import LevanteError

if TYPE_CHECKING:  # `levante --help` lists the suites without importing the client
    from openai import AsyncOpenAI
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

SAMPLES = Path(__file__).parent / "samples"
"""Tiny samples written by us (never copied from the datasets): one `<suite>.jsonl` each."""


class DataMissing(LevanteError):
    """A dataset file is not in --data-dir; the message names the file and where to get it."""


@dataclass(frozen=True)
class Item:
    """One benchmark question; `data` holds the suite's own fields (question, choices, tests…)."""

    id: str
    data: dict[str, Any]


@dataclass
class Record:
    """One item's outcome, a row of the results file: what was asked, what came back, its scores."""

    id: str
    prompt: Any
    answer: Any
    scores: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


NOOP_TOOL = {
    "type": "function",
    "function": {
        "name": "noop",
        "description": "Does nothing.",
        "parameters": {"type": "object", "properties": {}},
    },
}
REFUSALS = (400, 413, 422)
"""Statuses with which an endpoint refuses what a probe asked (tools, images); a missing
/completions (404, 405, 501) refuses logprobs too, but a 404 elsewhere means a wrong URL or model
name, which the items then fail on."""
NO_ENDPOINT = (404, 405, 501)


@dataclass
class Endpoint:
    """The model under test behind the official OpenAI client (our server, vLLM, a hosted API).

    Knowing its context length (`max_model_len` in /v1/models, as vLLM and our server report it,
    or --context-length), a chat request's max_tokens is cut to what the prompt leaves, the prompt
    counted by the server's /tokenize (ours and vLLM's): a suite that asks for 8192 tokens runs on
    a model with an 8192-token context instead of failing every item."""

    api: AsyncOpenAI
    model: str
    context: int | None = None
    fitted: int = 0  # requests whose max_tokens was cut to the context
    probes: dict[str, str | None] = field(default_factory=dict)  # capability → refusal (shared by views)
    uncountable: list[str] = field(default_factory=list)  # why prompts could not be counted, once seen

    def view(self) -> Endpoint:
        """The same endpoint with its own count of fitted requests (one per suite)."""
        return replace(self, fitted=0)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        if self.context is not None and params.get("max_tokens") and not self.uncountable:
            params["max_tokens"] = await self._fit(messages, params.get("tools"), params["max_tokens"])
        return await self.api.chat.completions.create(model=self.model, messages=messages, **params)

    async def complete(self, prompt: str | list[str], **params: Any) -> Completion:
        return await self.api.completions.create(model=self.model, prompt=prompt, **params)

    async def _fit(self, messages: list[dict[str, Any]], tools: Any, max_tokens: int) -> int:
        """max_tokens, or what the context leaves after the prompt when that is less (a prompt that
        fills the context is sent as asked: the endpoint's refusal then says why)."""
        import openai

        assert self.context is not None
        root = str(self.api.base_url).rstrip("/").removesuffix("/v1")
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            body["tools"] = tools
        try:
            counted = await self.api.post(
                f"{root}/tokenize", body=body, cast_to=dict[str, Any], options={"max_retries": 0}
            )
            count = int(counted["count"])
        except openai.APIStatusError as e:
            if e.status_code not in (400, 413, 422):  # not this prompt's fault: stop asking
                self.uncountable.append(f"{root}/tokenize: {e.status_code} {e.message}")
            return max_tokens  # the endpoint's answer to the request itself will say what is wrong
        except (openai.APIError, KeyError, TypeError, ValueError) as e:  # unreachable, or no count
            self.uncountable.append(f"{root}/tokenize: {type(e).__name__}: {e}")
            return max_tokens
        room = self.context - count
        if 0 < room < max_tokens:
            self.fitted += 1
            return room
        return max_tokens

    async def refuses(self, capability: str) -> str | None:
        """The endpoint's refusal of `capability` ("tools", "images", "logprobs") on a one-token
        probe, or None when it takes it; asked once per endpoint."""
        import openai

        if capability not in self.probes:
            try:
                await self._probe(capability)
                self.probes[capability] = None
            except openai.APIStatusError as e:
                missing = (
                    capability == "logprobs" and e.status_code in NO_ENDPOINT and self.model not in e.message
                )
                if e.status_code not in REFUSALS and not missing:
                    raise
                self.probes[capability] = f"{e.status_code} {e.message}"
            except NotApplicable as e:
                self.probes[capability] = str(e)
        return self.probes[capability]

    async def _probe(self, capability: str) -> None:
        hello = [{"role": "user", "content": "Hello"}]
        ask = functools.partial(
            self.api.chat.completions.create, model=self.model, max_tokens=1, temperature=0.0
        )
        if capability == "tools":
            await ask(messages=hello, tools=[NOOP_TOOL])
        elif capability == "images":
            content = [
                {"type": "image_url", "image_url": {"url": probe_image()}},
                {"type": "text", "text": "What is it?"},
            ]
            await ask(messages=[{"role": "user", "content": content}])
        elif capability == "logprobs":
            reply = await self.complete(["Hello"], max_tokens=0, echo=True, logprobs=0, temperature=0.0)
            if not reply.choices or reply.choices[0].logprobs is None:
                raise NotApplicable("it returned no log-probabilities of the prompt (echo with logprobs)")
        else:
            raise ValueError(f"unknown capability {capability!r}")


class NotApplicable(Exception):
    """The endpoint answered a probe without doing what it asked."""


def probe_image() -> str:
    """A 64×64 grey PNG as a data URL: larger than any vision encoder's patch."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Options:
    """Run-wide settings a suite may use; those that change results go into `Suite.settings()`."""

    samples: int = 5  # n per task for pass@k suites
    temperature: float | None = None  # None: the suite's own default
    max_tokens: int | None = None  # None: the suite's own default
    seed: int = 0
    judge: Endpoint | None = None  # for suites scored by an LLM judge (simpleqa)
    chat_only: bool = False  # the endpoint has no /v1/completions logprobs: generative variants
    anls_threshold: float = 0.5  # DocVQA: 0.5 the official ANLS, 0.0 Mistral's harness
    gpqa_subset: str = "diamond"  # GPQA: diamond, main or extended


class Suite(ABC):
    name: ClassVar[str]
    card: ClassVar[dict[str, float]] = {}
    """Metric name → the model card's published number, in percent (empty when the card has none)."""
    data_files: ClassVar[str] = ""
    """Which files --data-dir must hold and where users get them (shown when one is missing)."""

    def __init__(self, options: Options) -> None:
        self.options = options

    @abstractmethod
    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        """The items: the bundled sample when `sample`, else the real dataset (from a package or
        `data_dir`); raises DataMissing naming the file when it is not there."""

    def needs(self) -> tuple[str, ...]:
        """What the endpoint must take ("tools", "images", "logprobs"); one that refuses it makes
        this suite not applicable, reported with the refusal instead of scored as zeros."""
        return ()

    def skip_reason(self) -> str | None:
        """Why this suite cannot run with these options (e.g. no judge endpoint), or None; the
        runner then reports it as skipped instead of failing every item."""
        return None

    def settings(self) -> dict[str, Any]:
        """Whatever changes this suite's results besides the item (prompting, sampling, n); part
        of the cache key, so changing one reruns the items instead of reusing stale scores."""
        return {}

    @abstractmethod
    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        """Asks the endpoint and scores the answer. A failed sample is a score, not an exception;
        an exception here means the item could not be run at all (the runner reports it)."""

    @abstractmethod
    def summarize(self, records: list[Record]) -> dict[str, float]:
        """Metric name → value in percent over all records (the names `card` uses, plus extras)."""


def sample_rows(suite: str) -> list[dict[str, Any]]:
    """The bundled sample of `suite`, one JSON object a line."""
    path = SAMPLES / f"{suite}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def data_file(data_dir: Path | None, suite: type[Suite], *parts: str) -> Path:
    """`data_dir/<suite>/parts…` (one folder per suite), or DataMissing naming the file and where
    to get it."""
    if data_dir is None:
        raise DataMissing(f"{suite.name} needs --data-dir (or --sample); it reads {suite.data_files}")
    path = Path(data_dir).joinpath(suite.name, *parts)
    if not path.exists():
        raise DataMissing(f"{path} not found; {suite.name} reads {suite.data_files}")
    return path


def greedy_params(options: Options, max_tokens: int) -> dict[str, Any]:
    """Sampling for a suite scored on one answer: greedy unless --temperature, the suite's own
    max_tokens unless --max-tokens, --seed."""
    temperature = 0.0 if options.temperature is None else options.temperature
    return {"temperature": temperature, "max_tokens": options.max_tokens or max_tokens, "seed": options.seed}


def mean_percent(records: list[Record]) -> dict[str, float]:
    """Each score name's mean over the records that have it, in percent: the usual summary."""
    totals: dict[str, list[float]] = {}
    for r in records:
        for name, value in r.scores.items():
            totals.setdefault(name, []).append(value)
    return {name: 100 * sum(values) / len(values) for name, values in totals.items()}


SUITES: dict[str, str] = {
    "mmlu": "levante.evals.multiple_choice:MMLU",
    "mmlu_pro": "levante.evals.multiple_choice:MMLUPro",
    "gpqa": "levante.evals.multiple_choice:GPQA",
    "humaneval": "levante.evals.code:HumanEval",
    "humaneval_plus": "levante.evals.code:HumanEvalPlus",
    "mbpp_plus": "levante.evals.code:MBPPPlus",
    "ifeval": "levante.evals.ifeval:IFEval",
    "docvqa": "levante.evals.vision:DocVQA",
    "chartqa": "levante.evals.vision:ChartQA",
    "bfcl": "levante.evals.bfcl:BFCL",
    "loops": "levante.evals.loops:Loops",
    "simpleqa": "levante.evals.simpleqa:SimpleQA",
}
"""Suite name → `module:Class`; imported on use so one suite's dependencies never slow another."""


def suite_class(name: str) -> type[Suite]:
    if name not in SUITES:
        raise LevanteError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    module, _, cls = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
