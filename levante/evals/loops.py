"""The infinite-generation rate. The card's number (1.29%, "lower is better") comes from Mistral's
internal set of "challenging, long and repetitive prompts", unpublished, so this suite uses its
own: stress prompts that invite long, repetitive output, plus neutral controls that show how often
a normal answer trips the same measures. Each prompt runs at temperature 0.15 (Mistral's
recommendation) and greedy, with the loop guard off and on (vLLM's per-request
`repetition_detection`, at the settings of `levante serve --loop-guard`), under a large max_tokens.
Per condition it reports the share stopped by length (never ended: the card's sense), the share
whose tail is an exact loop and, with the guard on, the share the guard stopped. "Off" means the
request sets no guard, so it measures the model only against a server started without
--loop-guard."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from itertools import product
from pathlib import Path
from typing import Any, ClassVar

from levante.engine.guard import repeating_tail
from levante.engine.sampling_params import LOOP_GUARD_ON, RepetitionDetection
from levante.evals.suite import Endpoint, Item, Record, Suite, mean_percent, sample_rows

TEMPERATURES = {"t0.15": 0.15, "greedy": 0.0}
GUARD = {"off": None, "on": dataclasses.asdict(LOOP_GUARD_ON)}
TAIL_LOOP = RepetitionDetection(max_pattern_size=256, min_pattern_size=4, min_count=4)
"""The tail "loops" when its last words, spaces and punctuation marks are one block of 4–256 such
pieces repeated at least 4 times in a row (an exact cycle; a counting list is not one)."""

STRESS = [
    "Repeat the word '{w}' {n} times, separated by spaces.",
    "Write the numbers from 1 to {n}, each on its own line, followed by the word '{w}'.",
    "Write a {n}-line poem in which every line ends with the word '{w}'.",
    "Produce a JSON array of {n} objects, each with the fields id, name and tag, where tag is always '{w}'.",
    "Write a story of at least {n} words about a {w}. Begin every paragraph with 'And then'.",
    "List {n} different adjectives that could describe a {w}, one per line, with no repeats.",
    "Write a Python module with {n} functions named {w}_1, {w}_2 and so on, each returning its number.",
    "Translate the sentence 'The {w} is on the table' into as many languages as you can, at least {n}.",
    "Write a markdown table with {n} rows and the columns Day, {w} count and Notes, filling every cell.",
    "Keep writing the sequence '{w}, {w} {w}, {w} {w} {w}' and so on, for {n} terms.",
]
FILLERS = [("apple", 200), ("river", 300), ("lantern", 150), ("engine", 400), ("violet", 250)]
CONTROLS = [
    "What is the capital of {c}? Answer in one sentence.",
    "Give two facts about {c} in under 50 words.",
    "Explain in three sentences why {c} has the climate it has.",
    "Suggest a short name for a café in {c}, with one line on why.",
]
COUNTRIES = ["Portugal", "Kenya", "Chile", "Vietnam", "Norway"]


def prompt_set() -> list[dict[str, str]]:
    """Levante's full set: 50 stress prompts (10 templates x 5 fillers) and 20 controls."""
    rows = [
        {"id": f"stress/{i}", "group": "stress", "prompt": t.format(w=w, n=n)}
        for i, (t, (w, n)) in enumerate(product(STRESS, FILLERS))
    ]
    rows += [
        {"id": f"control/{i}", "group": "control", "prompt": t.format(c=c)}
        for i, (t, c) in enumerate(product(CONTROLS, COUNTRIES))
    ]
    return rows


def tail_loops(text: str) -> bool:
    pieces = re.findall(r"\w+|[^\w\s]|\s+", text)
    ids: dict[str, int] = {}
    return repeating_tail([ids.setdefault(p, len(ids)) for p in pieces], TAIL_LOOP)


class Loops(Suite):
    name = "loops"
    card: ClassVar[dict[str, float]] = {"stress_t0.15_off_length": 1.29}
    data_files = "none: the prompts are Levante's own (levante/evals/loops.py)"

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        rows = sample_rows(self.name) if sample else prompt_set()
        return [Item(r["id"], {"group": r["group"], "prompt": r["prompt"]}) for r in rows]

    def settings(self) -> dict[str, Any]:
        return {
            "max_tokens": self.options.max_tokens or 8192,
            "seed": self.options.seed,
            "guard": GUARD["on"],
            "tail_loop": dataclasses.asdict(TAIL_LOOP),
        }

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        """The four conditions at once, so they share the server's batches."""
        group, messages = item.data["group"], [{"role": "user", "content": item.data["prompt"]}]
        conditions = list(product(TEMPERATURES.items(), GUARD.items()))
        replies = await asyncio.gather(
            *(
                endpoint.chat(
                    messages,
                    temperature=temperature,
                    max_tokens=self.options.max_tokens or 8192,
                    seed=self.options.seed,
                    extra_body={"repetition_detection": detection} if detection else None,
                )
                for (_, temperature), (_, detection) in conditions
            )
        )
        answers, scores, info = {}, {}, {}
        for ((temp, _), (guard, _)), reply in zip(conditions, replies, strict=True):
            choice, condition = reply.choices[0], f"{temp}_{guard}"
            answers[condition] = choice.message.content or ""
            scores[f"{group}_{condition}_length"] = float(choice.finish_reason == "length")
            scores[f"{group}_{condition}_loop"] = float(tail_loops(answers[condition]))
            if guard == "on":
                scores[f"{group}_{condition}_guard"] = float(choice.finish_reason == "repetition")
            tokens = reply.usage.completion_tokens if reply.usage else None
            info[condition] = {"finish_reason": choice.finish_reason, "completion_tokens": tokens}
        return Record(item.id, messages, answers, scores, info)

    def summarize(self, records: list[Record]) -> dict[str, float]:
        return mean_percent(records)
