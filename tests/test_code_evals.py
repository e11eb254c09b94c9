"""HumanEval, HumanEval+ and MBPP+: the pass@k estimator against its closed form, code extraction
from chat answers, and scoring in the real sandbox: known-good and known-bad solutions of every
bundled sample problem, plus tests that catch what base tests miss, EvalPlus's float tolerance,
MBPP+'s input conversions and special oracles, data files, and one run against a real server."""

from __future__ import annotations

import asyncio
import gzip
import json
from math import comb
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from servers import ServerProcess

from levante.errors import LevanteError
from levante.evals.code import (
    HumanEval,
    HumanEvalPlus,
    MBPPPlus,
    extract_code,
    mbpp_inputs,
    pass_at_k,
    score,
    solution,
)
from levante.evals.suite import SAMPLES, DataMissing, Endpoint, Options, Record, suite_class

SUITES = ["humaneval", "humaneval_plus", "mbpp_plus"]


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_closed_form(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-9, abs=1e-12)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0  # with n = k: "any passed"
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(200, 200, 100) == 1.0
    for bad in [(5, 6, 1), (5, 1, 6), (5, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(*bad)


ANSWER = """Sure! Here is a helper first:

```python
import math

SCALE = 2

def helper(x):
    return x * SCALE

def area(r):
    return math.pi * helper(r)

print(area(3))
assert area(1) > 0
if __name__ == "__main__":
    area(input())
```
And some tests:
```python
def test():
    assert area(2)
```"""


def test_extract_code_keeps_what_the_entry_point_reaches() -> None:
    code = extract_code(ANSWER, "area")
    assert code.splitlines() == [
        *("import math", "SCALE = 2", "def helper(x):", "    return x * SCALE"),
        *("def area(r):", "    return math.pi * helper(r)"),
    ]
    cut_off = "```py\ndef f():\n    return 1\nprint(f(), 'the answer ran out of tok"  # unclosed, unparsable
    assert extract_code(cut_off, "f") == "def f():\n    return 1"
    assert extract_code("def f(: nope", "f") == "def f(: nope"  # no block, not Python: as is
    assert extract_code("```python\nx = 1\n```\n```python\n@cache\ndef g():\n    return x\n```", "g") == (
        "@cache\ndef g():\n    return x"
    )


def rows(suite: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SAMPLES / f"{suite}.jsonl").read_text().splitlines()]


def as_answer(problem: dict[str, Any], body: str) -> str:
    """A chat answer whose code block restates the function (with the prompt's imports)."""
    return f"Here you go:\n```python\n{problem['prompt']}{body}```\nDone."


async def score_answers(name: str, problem: dict[str, Any], answers: list[str]) -> list[dict[str, Any]]:
    suite = suite_class(name)(Options())
    codes = [solution(problem["prompt"], answer, problem["entry_point"]) for answer in answers]
    return await asyncio.gather(*(score(suite.job(problem, code)) for code in codes))


@pytest.mark.parametrize("name", SUITES)
def test_samples_known_good_pass_and_known_bad_fail(name: str) -> None:
    problems = rows(name)
    assert 1 <= len(problems) <= 10
    assert [item.id for item in suite_class(name)(Options()).load(None, sample=True)] == [
        p["task_id"] for p in problems
    ]

    async def all_problems() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(
            *(
                score_answers(
                    name, p, [as_answer(p, p["canonical_solution"]), as_answer(p, "    return None\n")]
                )
                for p in problems
            )
        )

    for problem, (good, bad) in zip(problems, asyncio.run(all_problems()), strict=True):
        assert good["base"] == "pass" and good.get("plus", "pass") == "pass", (problem["task_id"], good)
        assert bad["base"] == "fail" and bad["error"], (problem["task_id"], bad)


def sample(name: str, task_id: str) -> dict[str, Any]:
    return next(p for p in rows(name) if p["task_id"] == task_id)


def test_plus_inputs_catch_what_the_base_inputs_miss() -> None:
    hypot = sample("humaneval_plus", "HumanEval/sample-0")  # plus has legs of 1e200: a*a overflows
    naive = as_answer(hypot, "    return (a * a + b * b) ** 0.5\n")
    (report,) = asyncio.run(score_answers("humaneval_plus", hypot, [naive]))
    assert report["base"] == "pass" and report["plus"] == "fail" and "1e+200" in report["error"]


def test_float_tolerance_follows_evalplus() -> None:
    """atol 0 on a float task becomes 1e-6 (with rtol 1e-7); a task's own atol is used as given;
    an int equal to the float passes (exact match); another type does not."""
    hypot = sample("humaneval_plus", "HumanEval/sample-0")
    squares = sample("humaneval_plus", "HumanEval/sample-4")  # atol 1e-4
    cases = [
        (hypot, "    return math.hypot(a, b) * (1 + 5e-8)\n", "pass"),
        (hypot, "    return math.hypot(a, b) + 1e-3\n", "fail"),
        (hypot, "    h = math.hypot(a, b)\n    return int(h) if h == int(h) else h\n", "pass"),
        (hypot, "    return str(math.hypot(a, b))\n", "fail"),
        (squares, "    return sum(v * v for v in values) / len(values) + 5e-5\n", "pass"),
        (squares, "    return sum(v * v for v in values) / len(values) + 5e-4\n", "fail"),
    ]

    async def all_cases() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(score_answers("humaneval_plus", p, [as_answer(p, b)]) for p, b, _ in cases)
        )

    for (_, body, expected), (report,) in zip(cases, asyncio.run(all_cases()), strict=True):
        assert report["base"] == expected, (body, report)


def test_mbpp_inputs_become_tuples_sets_and_complex_numbers() -> None:
    assert mbpp_inputs("Mbpp/2", [[[3, 4], [4, 5]]]) == [[(3, 4), (4, 5)]]
    assert mbpp_inputs("Mbpp/580", [[[1, [2, [3]]]]]) == [((1, (2, (3,))),)]
    assert mbpp_inputs("Mbpp/115", [[[[1], []]]]) == [[[{1}, {}]]]
    assert mbpp_inputs("Mbpp/252", [["1+2j"]]) == [[1 + 2j]]
    assert mbpp_inputs("Mbpp/3", [[[1, 2]]]) == [[[1, 2]]]  # no rule: as in the file
    assert mbpp_inputs("HumanEval/2", [[[1, 2]]]) == [[[1, 2]]]


def test_mbpp_set_oracle_on_converted_tuples() -> None:
    """Mbpp/2 takes tuples (converted from JSON lists) and is scored as a set: any order passes."""
    problem = {
        "task_id": "Mbpp/2",
        "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n"""\n',
        "entry_point": "similar_elements",
        "canonical_solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
        "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
        "plus_input": [[[1, 2, 3], [3, 2]]],
        "atol": 0,
    }
    reversed_set = "(*(set(a) & set(b)),)[::-1]"
    answers = [
        as_answer(
            problem, f"def similar_elements(a, b):\n    assert type(a) is tuple\n    return {reversed_set}\n"
        ),
        as_answer(problem, "def similar_elements(a, b):\n    return a\n"),
    ]
    ordered, wrong = asyncio.run(score_answers("mbpp_plus", problem, answers))
    assert (ordered["base"], ordered["plus"]) == ("pass", "pass") and wrong["base"] == "fail"


@pytest.mark.parametrize("cls", [HumanEvalPlus, MBPPPlus])
def test_evalplus_release_files_from_data_dir(cls: type[HumanEvalPlus], tmp_path: Path) -> None:
    for where in (None, tmp_path):
        with pytest.raises(DataMissing, match=cls.file if where else "--data-dir"):
            cls(Options()).load(where, sample=False)
    (tmp_path / cls.name).mkdir()
    with gzip.open(tmp_path / cls.name / cls.file, "wt") as f:
        f.write((SAMPLES / f"{cls.name}.jsonl").read_text())
    assert [i.id for i in cls(Options()).load(tmp_path, sample=False)] == [
        p["task_id"] for p in rows(cls.name)
    ]
    (tmp_path / cls.name / cls.file).write_bytes(gzip.compress(b'{"task_id": "X", "prompt": ""}\n'))
    with pytest.raises(LevanteError, match=rf"{cls.file}:1: missing field 'entry_point'"):
        cls(Options()).load(tmp_path, sample=False)


def test_humaneval_ships_in_its_package() -> None:
    items = HumanEval(Options()).load(None, sample=False)
    assert [i.id for i in items] == [f"HumanEval/{n}" for n in range(164)]


def test_summary_reports_only_the_ks_every_task_has() -> None:
    records = [Record("a", "", [], {"pass@1": 1.0, "pass@5": 1.0}), Record("b", "", [], {"pass@1": 0.25})]
    assert HumanEval(Options()).summarize(records) == {"pass@1": 62.5}
    assert HumanEval(Options()).summarize([]) == {}


def test_run_against_a_real_server(demo: ServerProcess) -> None:
    """Two samples of one sample problem from the demo model: whatever it writes is extracted,
    run and scored, and the record holds every answer and every sample's verdict."""
    suite = MBPPPlus(Options(samples=2, max_tokens=32, seed=3))
    item = suite.load(None, sample=True)[0]

    async def go() -> Record:
        api = openai.AsyncOpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0)
        model = (await api.models.list()).data[0].id
        return await suite.run(item, Endpoint(api, model))

    record = asyncio.run(go())
    assert record.id == item.id and len(record.answer) == 2 and record.prompt[0]["role"] == "system"
    assert set(record.scores) == {"pass@1", "base_pass@1"} and 0 <= record.scores["pass@1"] <= 1
    assert [s["base"] in ("pass", "fail", "timeout") for s in record.info["samples"]] == [True, True]
    assert suite.settings() == {"samples": 2, "seed": 3, "temperature": 0.8, "top_p": 0.95, "max_tokens": 32}
