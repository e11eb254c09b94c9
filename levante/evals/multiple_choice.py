"""Multiple-choice suites: MMLU (5-shot, log-likelihood of the answer letter or a generative
variant for chat-only endpoints), MMLU-Pro (5-shot chain of thought) and GPQA (chain of thought,
choices shuffled with a fixed seed). Each follows its reference harness's prompt and scoring; the
chain-of-thought suites report the share of answers with no extractable letter instead of
guessing one, as MMLU-Pro's reference script does."""

from __future__ import annotations

import csv
import json
import random
import re
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from levante.evals.suite import (
    DataMissing,
    Endpoint,
    Item,
    Record,
    Suite,
    data_file,
    greedy_params,
    mean_percent,
    sample_rows,
)

LETTERS = "ABCDEFGHIJ"


def first_match(patterns: list[str], text: str) -> str | None:
    """The letter captured by the first pattern (in order) that matches anywhere in `text`."""
    for pattern in patterns:
        match = re.search(pattern, text, re.DOTALL)
        if match:
            return match.group(1)
    return None


def extract_mmlu_pro(text: str) -> str | None:
    """MMLU-Pro's cascade: "answer is (X)", else the last "Answer: X", else the last standalone
    letter A–J; None when all three fail (counted as wrong and as no-answer)."""
    return first_match(
        [r"answer is \(?([A-J])\)?", r".*[aA]nswer:\s*\(?([A-J])", r".*\b([A-J])\b"],
        text,
    )


def extract_gpqa(text: str) -> str | None:
    """GPQA's chain-of-thought format asks for "The correct answer is (X)"; then "Answer: X",
    then the last parenthesised letter."""
    return first_match([r"answer is \(?([A-D])\)?", r".*[aA]nswer:\s*\(?([A-D])", r".*\(([A-D])\)"], text)


def extract_letter(text: str) -> str | None:
    """A short generative MMLU reply ("B", "B. Paris", "The answer is B"): "answer is X", else a
    leading letter, else the first standalone one."""
    return first_match([r"answer is \(?([A-D])\b", r"^\W*([A-D])\b", r"\b([A-D])\b"], text)


def common_prefix(lists: list[list[str]]) -> int:
    """How many leading entries all the lists share."""
    n = 0
    for column in zip(*lists, strict=False):
        if len(set(column)) > 1:
            break
        n += 1
    return n


class ChoiceSuite(Suite):
    """Shared by the three: a prompt per item, a greedy answer, a letter extracted and compared."""

    shots: ClassVar[int] = 5
    default_max_tokens: ClassVar[int] = 2048
    extract: ClassVar[Callable[[str], str | None]]

    @abstractmethod
    def prompt(self, item: Item) -> str:
        """The whole prompt of one item, few-shot examples included."""

    def sampling(self) -> dict[str, Any]:
        return greedy_params(self.options, self.default_max_tokens)

    def settings(self) -> dict[str, Any]:
        return {"shots": self.shots, **self.sampling()}

    def score_name(self) -> str:
        return "accuracy"

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        prompt = self.prompt(item)
        reply = await endpoint.chat([{"role": "user", "content": prompt}], **self.sampling())
        text = reply.choices[0].message.content or ""
        letter = type(self).extract(text)
        gold = item.data["answer"]
        return Record(
            item.id,
            prompt,
            text,
            {self.score_name(): float(letter == gold), "no_answer_rate": float(letter is None)},
            {"extracted": letter, "gold": gold, "finish_reason": reply.choices[0].finish_reason},
        )

    def summarize(self, records: list[Record]) -> dict[str, float]:
        return mean_percent(records)


# ---- MMLU ------------------------------------------------------------------------------------


def mmlu_example(row: dict[str, Any], with_answer: bool) -> str:
    lines = [row["question"], *(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))]
    return "\n".join(lines) + (f"\nAnswer: {row['answer']}\n\n" if with_answer else "\nAnswer:")


class MMLU(ChoiceSuite):
    """Hendrycks et al.'s prompt: a subject header, five dev questions with their letters, then the
    question ending in "Answer:". By default each letter " A"…" D" is scored by its log-likelihood
    through /v1/completions (echo + logprobs, max_tokens 0, one batched request per question);
    with --chat-only the reply's first letter is taken instead."""

    name = "mmlu"
    card: ClassVar[dict[str, float]] = {"accuracy": 80.50}
    data_files = (
        "mmlu/dev/<subject>_dev.csv and mmlu/test/<subject>_test.csv: the data/ folder of "
        "https://people.eecs.berkeley.edu/~hendrycks/data.tar (the original CSVs, no header row)"
    )
    extract = staticmethod(extract_letter)
    default_max_tokens = 8

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            rows = sample_rows(self.name)
        else:
            rows = []
            for split in ("dev", "test"):
                folder = data_file(data_dir, type(self), split)
                for path in sorted(folder.glob(f"*_{split}.csv")):
                    rows += mmlu_csv(path, split)
            if not any(r["split"] == "test" for r in rows):
                raise DataMissing(f"no <subject>_test.csv in {folder}; {self.name} reads {self.data_files}")
        shots: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["split"] == "dev":
                shots.setdefault(r["subject"], []).append(r)
        tests = [r for r in rows if r["split"] == "test"]
        return [
            Item(f"{r['subject']}/{i}", {**r, "shots": shots.get(r["subject"], [])[: self.shots]})
            for i, r in enumerate(tests)
        ]

    def settings(self) -> dict[str, Any]:
        if self.options.chat_only:
            return {"mode": "generative", **super().settings()}
        return {"mode": "loglikelihood", "shots": self.shots}

    def needs(self) -> tuple[str, ...]:
        return () if self.options.chat_only else ("logprobs",)

    def prompt(self, item: Item) -> str:
        subject = item.data["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        return (
            header
            + "".join(mmlu_example(s, True) for s in item.data["shots"])
            + mmlu_example(item.data, False)
        )

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        if self.options.chat_only:
            return await super().run(item, endpoint)
        prompt = self.prompt(item)
        letters = LETTERS[: len(item.data["choices"])]
        reply = await endpoint.complete(
            [f"{prompt} {x}" for x in letters], max_tokens=0, echo=True, logprobs=0, temperature=0.0
        )
        choices = sorted(reply.choices, key=lambda c: c.index)
        if len(choices) != len(letters) or any(c.logprobs is None for c in choices):
            raise ValueError("the endpoint returned no prompt logprobs for echo; rerun with --chat-only")
        tokens = [c.logprobs.tokens or [] for c in choices]  # type: ignore[union-attr]
        start = common_prefix(tokens)  # the letters' tokens: where the four prompts differ
        scores = {
            x: sum(c.logprobs.token_logprobs[start:])  # type: ignore[union-attr, arg-type]
            for x, c in zip(letters, choices, strict=True)
        }
        pick = max(scores, key=scores.__getitem__)
        gold = item.data["answer"]
        return Record(
            item.id, prompt, pick, {"accuracy": float(pick == gold)}, {"logprobs": scores, "gold": gold}
        )


def mmlu_csv(path: Path, split: str) -> list[dict[str, Any]]:
    subject = path.name.removesuffix(f"_{split}.csv")
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for n, fields in enumerate(csv.reader(f), 1):
            if len(fields) != 6 or fields[5].strip() not in "ABCD":
                raise DataMissing(f"{path}:{n}: expected question,A,B,C,D,answer; got {len(fields)} fields")
            rows.append(
                {
                    "subject": subject,
                    "split": split,
                    "question": fields[0],
                    "choices": fields[1:5],
                    "answer": fields[5].strip(),
                }
            )
    return rows


# ---- MMLU-Pro --------------------------------------------------------------------------------


def mmlu_pro_example(row: dict[str, Any], with_answer: bool) -> str:
    options = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(row["options"]))
    body = f"Question: {row['question']}\nOptions: {options}"
    if not with_answer:
        return body + "Answer: Let's think step by step."
    cot = row["cot_content"].removeprefix("A: ")
    return body + f"Answer: {cot}\n\n"


class MMLUPro(ChoiceSuite):
    """TIGER-Lab's 5-shot CoT: the category's five validation questions with their worked answers,
    then the question; greedy, and the letter found by the reference's three-step cascade."""

    name = "mmlu_pro"
    card: ClassVar[dict[str, float]] = {"accuracy": 69.06}
    data_files = (
        "mmlu_pro/test-00000-of-00001.parquet and mmlu_pro/validation-00000-of-00001.parquet from "
        "https://hf.barry1.top/datasets/TIGER-Lab/MMLU-Pro (data/ folder; reading parquet needs pyarrow)"
    )
    extract = staticmethod(extract_mmlu_pro)

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            rows = sample_rows(self.name)
        else:
            rows = []
            for split in ("validation", "test"):
                path = data_file(data_dir, type(self), f"{split}-00000-of-00001.parquet")
                rows += [{**r, "split": split} for r in read_parquet(path)]
        shots: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            r["options"] = [o for o in r["options"] if o != "N/A"]  # padding in the published file
            if r["split"] == "validation":
                shots.setdefault(r["category"], []).append(r)
        return [
            Item(str(r["question_id"]), {**r, "shots": shots.get(r["category"], [])[: self.shots]})
            for r in rows
            if r["split"] == "test"
        ]

    def prompt(self, item: Item) -> str:
        header = (
            f"The following are multiple choice questions (with answers) about {item.data['category']}. "
            "Think step by step and then output the answer in the format of "
            '"The answer is (X)" at the end.\n\n'
        )
        return (
            header
            + "".join(mmlu_pro_example(s, True) for s in item.data["shots"])
            + mmlu_pro_example(item.data, False)
        )


def read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataMissing(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


# ---- GPQA ------------------------------------------------------------------------------------


def gpqa_example(row: dict[str, Any], with_answer: bool) -> str:
    choices = "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(row["choices"]))
    body = f"Question: {row['question']}\nChoices:\n{choices}Let's think step by step:\n"
    return body + (
        f"{row['explanation']}\nThe correct answer is ({row['answer']})\n\n" if with_answer else ""
    )


class GPQA(ChoiceSuite):
    """The GPQA authors' chain-of-thought few-shot format (their own worked examples, not dataset
    items); each question's four answers are shuffled by a generator seeded with --seed and the
    question's record id, so a run is reproducible and independent of --limit and order."""

    name = "gpqa"
    card: ClassVar[dict[str, float]] = {"accuracy_diamond": 46.13, "accuracy_main": 44.22}
    data_files = (
        "gpqa/gpqa_<subset>.csv (subset: --gpqa-subset, diamond by default) from the password-protected "
        "dataset.zip of https://github.com/idavidrein/gpqa (or the gated "
        "https://hf.barry1.top/datasets/Idavidrein/gpqa), and gpqa/chain_of_thought_examples.json "
        "from that repository's prompts/ folder"
    )
    extract = staticmethod(extract_gpqa)

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            rows = sample_rows(self.name)
            shots = [r for r in rows if r["split"] == "shot"]
            tests = [r for r in rows if r["split"] == "test"]
        else:
            subset = self.options.gpqa_subset
            tests = gpqa_csv(data_file(data_dir, type(self), f"gpqa_{subset}.csv"))
            path = data_file(data_dir, type(self), "chain_of_thought_examples.json")
            shots = [
                {
                    "question": q["question"],
                    "choices": list(q["choices"].values()),
                    "answer": q["correct_answer"],
                    "explanation": q["explanation"],
                }
                for q in json.loads(path.read_text())["questions"]
            ]
        return [Item(r["id"], self.shuffled(r, shots[: self.shots])) for r in tests]

    def shuffled(self, row: dict[str, Any], shots: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [row["correct"], *row["incorrect"]]
        random.Random(f"gpqa/{self.options.seed}/{row['id']}").shuffle(choices)
        return {
            "question": row["question"],
            "choices": choices,
            "answer": LETTERS[choices.index(row["correct"])],
            "shots": shots,
        }

    def settings(self) -> dict[str, Any]:
        return {"subset": self.options.gpqa_subset, **super().settings()}

    def score_name(self) -> str:
        return f"accuracy_{self.options.gpqa_subset}"

    def prompt(self, item: Item) -> str:
        header = (
            "Answer the last question like the worked examples: reason step by step, then end with "
            '"The correct answer is (X)".\n\n'
        )
        return (
            header
            + "".join(gpqa_example(s, True) for s in item.data["shots"])
            + gpqa_example(item.data, False)
        )


def gpqa_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    needed = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing or not rows:
        raise DataMissing(f"{path}: not GPQA's CSV (missing columns {missing or needed})")
    return [
        {
            "id": r.get("Record ID") or str(i),
            "question": r["Question"].strip(),
            "correct": r["Correct Answer"].strip(),
            "incorrect": [r[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)],
        }
        for i, r in enumerate(rows)
    ]
