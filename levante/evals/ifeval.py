"""IFEval: 541 prompts whose instructions a program can verify ("answer in under 100 words", "no
commas", "wrap it in JSON"), scored strict and loose, per prompt and per instruction — the four
numbers lm-evaluation-harness reports. Greedy, 0-shot, 1280 new tokens, as its reference runs.

The card's "IF (Internal) 84.78" is Mistral's own instruction-following set, not IFEval, so there
is no card number to put next to ours."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from levante.errors import LevanteError
from levante.evals.ifeval_checks import INSTRUCTIONS, follows
from levante.evals.suite import SAMPLES, Endpoint, Item, Record, Suite, data_file, greedy_params

REQUEST_ERRORS = (400, 413, 422)
"""Statuses that say this request was bad for the model (prompt too long, tools it cannot take)."""


@dataclass(frozen=True)
class Refusal:
    message: str


async def ask(endpoint: Endpoint, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion | Refusal:
    """The endpoint's answer, or its refusal when it rejected this request as bad: that is the
    item's failure (the model cannot do it), scored as such, not the run's. A bad key, an unknown
    model, rate limits, server errors and lost connections say nothing about the item, so they
    propagate and the runner reports them instead of scoring zeros."""
    try:
        return await endpoint.chat(messages, **params)
    except openai.APIStatusError as e:
        if e.status_code not in REQUEST_ERRORS:
            raise
        return Refusal(e.message)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); a bad line is an error naming file and line."""
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise LevanteError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(entry, dict):
            raise LevanteError(f"{path}:{n}: expected a JSON object")
        entries.append(entry)
    return entries


def parse(entry: dict[str, Any], where: str) -> Item:
    """One dataset line as an item. Each instruction is tried once on a probe text here, so a
    missing, unknown or ill-typed kwarg fails the load naming the item, not the run half-way.
    Null kwargs are dropped: the Hugging Face copy gives every key to every instruction."""
    try:
        key, prompt = entry["key"], entry["prompt"]
        ids, kwargs_list = entry["instruction_id_list"], entry["kwargs"]
    except KeyError as e:
        raise LevanteError(f"{where}: missing field {e.args[0]!r}") from None
    if len(ids) != len(kwargs_list):
        raise LevanteError(f"{where}: {len(ids)} instruction ids but {len(kwargs_list)} kwargs")
    kwargs_list = [{k: v for k, v in kwargs.items() if v is not None} for kwargs in kwargs_list]
    for instruction, kwargs in zip(ids, kwargs_list, strict=True):
        if instruction not in INSTRUCTIONS:
            raise LevanteError(f"{where}: unknown instruction {instruction!r}")
        try:
            INSTRUCTIONS[instruction]("probe", **kwargs)
        except (TypeError, ValueError) as e:
            raise LevanteError(f"{where}: kwargs of {instruction}: {e}") from None
    return Item(str(key), {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs_list})


class IFEval(Suite):
    name = "ifeval"
    data_files = (
        "ifeval/ifeval_input_data.jsonl from the Hugging Face dataset google/IFEval "
        "(https://hf.barry1.top/datasets/google/IFEval, Apache-2.0)"
    )

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        file = "ifeval_input_data.jsonl"
        path = SAMPLES / "ifeval.jsonl" if sample else data_file(data_dir, type(self), file)
        return [parse(entry, f"{path} key {entry.get('key')}") for entry in read_jsonl(path)]

    def settings(self) -> dict[str, Any]:
        return greedy_params(self.options, 1280)

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        """A refused request scores as an empty answer: every instruction unfollowed."""
        messages = [{"role": "user", "content": item.data["prompt"]}]
        reply = await ask(endpoint, messages, **self.settings())
        if isinstance(reply, Refusal):
            return self.score(item, "", reply.message)
        return self.score(item, reply.choices[0].message.content or "")

    def score(self, item: Item, text: str, error: str | None = None) -> Record:
        pairs = list(zip(item.data["instruction_id_list"], item.data["kwargs"], strict=True))
        strict = [follows(i, kwargs, text, loose=False) for i, kwargs in pairs]
        loose = [follows(i, kwargs, text, loose=True) for i, kwargs in pairs]
        scores = {
            "prompt_level_strict_acc": float(all(strict)),  # the metric's name: its mean over prompts
            "prompt_level_loose_acc": float(all(loose)),
            "instructions": float(len(pairs)),
            "followed_strict": float(sum(strict)),
            "followed_loose": float(sum(loose)),
        }
        info: dict[str, Any] = {"strict": strict, "loose": loose}
        if error is not None:
            info["error"] = error
        return Record(item.id, item.data["prompt"], text, scores, info)

    def summarize(self, records: list[Record]) -> dict[str, float]:
        """Prompt level: the share of prompts with every instruction followed. Instruction level:
        the share of all instructions followed, pooled over prompts."""
        if not records:
            return {}
        total = sum(r.scores["instructions"] for r in records)
        return {
            "prompt_level_strict_acc": 100 * sum(prompt_level(r, "strict") for r in records) / len(records),
            "inst_level_strict_acc": 100 * sum(r.scores["followed_strict"] for r in records) / total,
            "prompt_level_loose_acc": 100 * sum(prompt_level(r, "loose") for r in records) / len(records),
            "inst_level_loose_acc": 100 * sum(r.scores["followed_loose"] for r in records) / total,
        }


def prompt_level(record: Record, kind: str) -> float:
    """Whether every instruction of the prompt was followed; records cached before 2026-12-06
    name it prompt_<kind>."""
    return record.scores.get(f"prompt_level_{kind}_acc", record.scores.get(f"prompt_{kind}", 0.0))
