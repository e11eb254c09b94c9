"""SimpleQA: short factual questions, each answer graded CORRECT / INCORRECT / NOT_ATTEMPTED by a
judge model (--judge-endpoint), as OpenAI's simple-evals does. The card's 12.10 is "TotalAcc":
correct over all questions. Scores depend on the judge, so compare only runs graded by the same
one; without a judge the suite is skipped."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, ClassVar

from levante.evals.suite import Endpoint, Item, Record, Suite, data_file, greedy_params, sample_rows

GRADES = {"A": "correct", "B": "incorrect", "C": "not_attempted"}

JUDGE_PROMPT = """You grade answers to short factual questions against a gold answer.

Question: {question}
Gold answer: {gold}
Answer to grade: {answer}

Grade A (CORRECT) if the answer contains the gold answer's meaning and nothing contradicting it;
hedging is fine as long as the final answer is right, and numbers must match the gold answer to
its last significant figure. Grade B (INCORRECT) if the answer states something that contradicts
the gold answer, even with a hedge. Grade C (NOT_ATTEMPTED) if the answer does not commit to an
answer (a refusal, "I don't know", or only related facts).

Reply with the single letter A, B or C."""


def grade(judge_reply: str) -> str:
    """The judge's first standalone A/B/C; NOT_ATTEMPTED when it gave none, as simple-evals does."""
    match = re.search(r"\b([ABC])\b", judge_reply)
    return GRADES[match.group(1) if match else "C"]


def simpleqa_metrics(counts: dict[str, float], total: int) -> dict[str, float]:
    """simple-evals' summary in percent: the three shares, accuracy given attempted, and the F1 of
    that and overall correctness."""
    if total == 0:
        return {}
    correct = counts["correct"] / total
    attempted = (counts["correct"] + counts["incorrect"]) / total
    given = correct / attempted if attempted else 0.0
    f1 = 2 * given * correct / (given + correct) if given + correct else 0.0
    shares = {name: 100 * counts[name] / total for name in GRADES.values()}
    return {**shares, "accuracy_given_attempted": 100 * given, "f1": 100 * f1}


class SimpleQA(Suite):
    name = "simpleqa"
    card: ClassVar[dict[str, float]] = {"correct": 12.10}
    data_files = (
        "simpleqa/simple_qa_test_set.csv (columns metadata, problem, answer) from "
        "https://openaipublic.blob.core.windows.net/simple-evals/simple_qa_test_set.csv"
    )

    def skip_reason(self) -> str | None:
        if self.options.judge is None:
            return "needs a judge model to grade answers: pass --judge-endpoint URL (and --judge-model)"
        return None

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            rows = sample_rows(self.name)
        else:
            with data_file(data_dir, type(self), "simple_qa_test_set.csv").open(newline="") as f:
                rows = [{**r, "id": str(i)} for i, r in enumerate(csv.DictReader(f))]
        return [Item(r["id"], {"problem": r["problem"], "answer": r["answer"]}) for r in rows]

    def sampling(self) -> dict[str, Any]:
        return greedy_params(self.options, 512)

    def settings(self) -> dict[str, Any]:
        judge = self.options.judge
        return {**self.sampling(), "judge": judge.model if judge else None}

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        judge = self.options.judge
        assert judge is not None, "skip_reason() keeps the runner from getting here"
        messages = [{"role": "user", "content": item.data["problem"]}]
        reply = await endpoint.chat(messages, **self.sampling())
        answer = reply.choices[0].message.content or ""
        verdict_prompt = JUDGE_PROMPT.format(
            question=item.data["problem"], gold=item.data["answer"], answer=answer
        )
        verdict = await judge.chat(
            [{"role": "user", "content": verdict_prompt}], temperature=0.0, max_tokens=16
        )
        judged = verdict.choices[0].message.content or ""
        result = grade(judged)
        scores = {name: float(name == result) for name in GRADES.values()}
        return Record(item.id, messages, answer, scores, {"gold": item.data["answer"], "judge": judged})

    def summarize(self, records: list[Record]) -> dict[str, float]:
        counts = {name: sum(r.scores[name] for r in records) for name in GRADES.values()}
        return simpleqa_metrics(counts, len(records))
