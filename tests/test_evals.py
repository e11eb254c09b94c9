"""`levante eval`: the scorers against hand-worked cases, every suite's sample end to end through
the CLI against real servers, and a run killed half way that resumes from its cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from servers import ServerProcess

from levante.cli import main
from levante.evals.loops import tail_loops
from levante.evals.multiple_choice import common_prefix, extract_gpqa, extract_letter, extract_mmlu_pro
from levante.evals.runner import Cache
from levante.evals.simpleqa import grade, simpleqa_metrics
from levante.evals.suite import SUITES, DataMissing, Options, Record, suite_class
from levante.evals.vision import anls, final_answer, relaxed_correct

CLI = [sys.executable, "-m", "levante.cli", "eval"]
NEED_TINY = ("docvqa", "chartqa", "bfcl")  # images or tools: the demo model takes neither


# ---- scorers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "threshold", "expected"),
    [
        ("Paris", ["paris"], 0.5, 1.0),  # case and spacing do not count
        ("  New   York ", ["new york"], 0.5, 1.0),
        ("12/10/1998", ["12/10/1999"], 0.5, 0.9),  # one edit in ten characters
        ("4821", ["$312.50", "4822"], 0.5, 0.75),  # the best of the accepted answers
        ("ab", ["ac"], 0.5, 0.0),  # NL exactly 0.5: the official metric needs NL < 0.5
        ("ab", ["ac"], 0.0, 0.5),  # Mistral's threshold 0.0 keeps the partial credit
        ("abc", ["abd"], 0.5, 2 / 3),  # just inside the threshold
        ("invoice", ["receipt"], 0.5, 0.0),  # far
        ("invoice", ["receipt"], 0.0, 1 - 6 / 7),
        ("", ["total"], 0.0, 0.0),
    ],
)
def test_anls(prediction: str, answers: list[str], threshold: float, expected: float) -> None:
    assert anls(prediction, answers, threshold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "target", "correct"),
    [
        ("25", "25", True),
        ("1,234", "1234", True),  # thousands separator
        ("$5", "5", True),
        ("105", "100", True),  # exactly 5% off
        ("95", "100", True),
        ("105.1", "100", False),  # just over
        ("94.9", "100", False),
        ("0.19", "0.2", True),  # 5% in floating point
        ("45%", "45", True),  # a percent sign on either side, read either way
        ("0.45", "45%", True),
        ("46%", "0.45", True),
        ("50%", "45", False),
        ("0", "0", True),
        ("0.1", "0", False),
        ("Yes", "yes", True),
        ("No", "Yes", False),
        ("Rail", "Road", False),
    ],
)
def test_relaxed_accuracy(prediction: str, target: str, correct: bool) -> None:
    assert relaxed_correct(prediction, target) is correct


def test_final_answer_is_taken_after_the_last_answer_marker() -> None:
    reply = "The bars read 1,200 and 34.\nSo the answer: maybe.\nFinal Answer: **1,234**."
    assert final_answer(reply) == "1,234" and relaxed_correct(final_answer(reply), "1234")
    assert final_answer("42") == "42"


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("Speed is 120/2 = 60 km/h. The answer is (C).", "C"),
        ("so the answer is D because the force quarters", "D"),  # no parentheses
        ("The answer is (B). On reflection the answer is (E).", "B"),  # the first statement wins
        ("Step 1 ...\nAnswer: A\nWait, recheck.\nAnswer: G", "G"),  # no "answer is": the last Answer:
        ("Comparing options, I pick G over H and J here, so J", "J"),  # the last standalone letter
        ("No idea which one is right.", None),  # nothing: no-answer, never a guess
        ("the answer is (b)", None),  # lowercase letters are not options
    ],
)
def test_mmlu_pro_cascade(reply: str, letter: str | None) -> None:
    assert extract_mmlu_pro(reply) == letter


def test_gpqa_and_generative_mmlu_extraction() -> None:
    assert extract_gpqa("Let's think... The correct answer is (B)") == "B"
    assert extract_gpqa("it must be (A) or (D); (D) fits") == "D"
    assert extract_gpqa("E is not an option") is None
    assert extract_letter(" B. 56") == "B"
    assert extract_letter("The answer is C.") == "C"
    assert extract_letter("none of them") is None


def test_letter_scores_start_where_the_prompts_diverge() -> None:
    tokens = [["Answer", ":", " A"], ["Answer", ":", " B"], ["Answer", ":", " C"]]
    assert common_prefix(tokens) == 2
    assert common_prefix([["x", ": A"], ["x", ": B"]]) == 1  # a letter merged with the colon


def test_tail_loops_on_exact_cycles_only() -> None:
    assert tail_loops("Sure. " + "The bell rings again. " * 8)
    assert tail_loops("Result:" + " ok" * 40)
    assert not tail_loops("\n".join(str(i) for i in range(1, 300)))  # counting is not a loop
    assert not tail_loops("Lisbon is the capital of Portugal. It lies on the Tagus.")
    assert not tail_loops("Wait....")


def test_simpleqa_grades_and_metrics() -> None:
    assert grade("A") == "correct" and grade("The grade is B.") == "incorrect"
    assert grade("C") == grade("unsure") == "not_attempted"  # no letter: not attempted
    m = simpleqa_metrics({"correct": 2, "incorrect": 1, "not_attempted": 1}, 4)
    assert m["correct"] == 50 and m["not_attempted"] == 25
    assert m["accuracy_given_attempted"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(100 * 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_cache_drops_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    cache = Cache(path)
    cache.put("k1", "mmlu", Record("q1", "prompt", "A", {"accuracy": 1.0}))
    cache.close()
    with path.open("a") as f:
        f.write('{"key": "k2", "suite": "mmlu", "rec')  # killed mid-write
    cache = Cache(path)
    assert cache.get("k1") == Record("q1", "prompt", "A", {"accuracy": 1.0}) and cache.get("k2") is None
    cache.put("k3", "mmlu", Record("q3", "prompt", "B", {"accuracy": 0.0}))
    cache.close()
    assert set(Cache(path).records) == {"k1", "k3"}


# ---- data files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mmlu", "mmlu_pro", "gpqa", "docvqa", "chartqa", "simpleqa"])
def test_a_missing_data_file_is_named(name: str, tmp_path: Path) -> None:
    suite = suite_class(name)(Options())
    with pytest.raises(DataMissing, match="--data-dir"):
        suite.load(None, sample=False)
    with pytest.raises(DataMissing, match=str(tmp_path / name)):
        suite.load(tmp_path, sample=False)


def test_cli_says_which_file_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gpqa").mkdir()
    (tmp_path / "gpqa" / "gpqa_diamond.csv").write_text("Question,Correct Answer\n")
    assert main(["eval", "gpqa", "--data-dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "gpqa_diamond.csv: not GPQA's CSV" in err and "Incorrect Answer 1" in err


def test_real_dataset_files_are_read(tmp_path: Path) -> None:
    """The published layouts (written here by hand in their formats) load into items."""
    mmlu = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"astronomy_{split}.csv").write_text(
            '"Which planet is red?",Venus,Mars,Earth,Jupiter,B\n'
        )
    items = suite_class("mmlu")(Options()).load(tmp_path, sample=False)
    assert [i.id for i in items] == ["astronomy/0"] and len(items[0].data["shots"]) == 1

    gpqa = tmp_path / "gpqa"
    gpqa.mkdir()
    header = "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3,Record ID\n"
    (gpqa / "gpqa_diamond.csv").write_text(
        header + "Which is a noble gas?,Neon,Nitrogen,Oxygen,Sodium,recX\n"
    )
    shot = {"question": "q", "choices": {"A": "a", "B": "b"}, "explanation": "e", "correct_answer": "A"}
    (gpqa / "chain_of_thought_examples.json").write_text(json.dumps({"questions": [shot]}))
    (item,) = suite_class("gpqa")(Options(seed=3)).load(tmp_path, sample=False)
    again = suite_class("gpqa")(Options(seed=3)).load(tmp_path, sample=False)[0]
    assert item.id == "recX" and item.data == again.data  # the shuffle is fixed by seed and id
    assert item.data["choices"][ord(item.data["answer"]) - ord("A")] == "Neon"

    (tmp_path / "mmlu_pro").mkdir()
    row = {
        "question": "q?",
        "options": ["x", "y", "N/A"],
        "answer": "B",
        "cot_content": "A: y. The answer is (B).",
        "category": "law",
    }
    for split, qid in (("validation", 1), ("test", 2)):
        table = pa.Table.from_pylist([{**row, "question_id": qid}])
        pq.write_table(table, tmp_path / "mmlu_pro" / f"{split}-00000-of-00001.parquet")
    (item,) = suite_class("mmlu_pro")(Options()).load(tmp_path, sample=False)
    assert item.id == "2" and item.data["options"] == ["x", "y"] and len(item.data["shots"]) == 1

    (tmp_path / "docvqa" / "documents").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "docvqa" / "documents" / "p1.png")
    qa = {"questionId": 7, "question": "Date?", "answers": ["1998"], "image": "documents/p1.png"}
    (tmp_path / "docvqa" / "val_v1.0_withQT.json").write_text(json.dumps({"data": [qa]}))
    (item,) = suite_class("docvqa")(Options()).load(tmp_path, sample=False)
    assert item.id == "7" and Path(item.data["image"]).is_file()

    (tmp_path / "chartqa" / "test").mkdir(parents=True)
    for split in ("human", "augmented"):
        chart = [{"imgname": "c.png", "query": "Max?", "label": "12"}]
        (tmp_path / "chartqa" / "test" / f"test_{split}.json").write_text(json.dumps(chart))
    assert [i.id for i in suite_class("chartqa")(Options()).load(tmp_path, sample=False)] == [
        "human/0",
        "augmented/0",
    ]

    (tmp_path / "simpleqa").mkdir()
    (tmp_path / "simpleqa" / "simple_qa_test_set.csv").write_text('metadata,problem,answer\n"{}",Who?,Ada\n')
    (item,) = suite_class("simpleqa")(Options()).load(tmp_path, sample=False)
    assert item.data == {"problem": "Who?", "answer": "Ada"}


# ---- end to end ------------------------------------------------------------------------------


def eval_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def check_outputs(
    out: Path, names: list[str], skipped: tuple[str, ...] = (), refused: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every suite ran clean (no failed item, every metric in the report with its interval and n),
    was skipped, or — `refused`: suite → capability — was not applicable, with the endpoint's words."""
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["suites"]) == sorted(names)
    report = (out / "report.md").read_text()
    for name in names:
        suite = results["suites"][name]
        if name in skipped:
            assert suite["skipped"] and f"**{name}** skipped" in report
            continue
        if name in (refused or {}):
            assert suite["not_applicable"].startswith(f"the endpoint refuses {refused[name]}: 400 ")
            assert f"**{name}** not applicable: the endpoint refuses {refused[name]}" in report
            assert suite["records"] == [] and f"| {name} |" not in report  # no row of zeros
            continue
        assert suite["failures"] == {} and suite["records"] and suite["metrics"], name
        for r in suite["records"]:
            assert r["prompt"] and r["answer"] is not None and r["scores"], (name, r["id"])
        for metric, value in suite["metrics"].items():
            i = suite["intervals"][metric]
            assert i["low"] <= value <= i["high"] and i["n"] >= 1, (name, metric, i)
            card = suite["card"].get(metric)
            card_text = "" if card is None else f"{card:.2f}"
            ci = f"{i['low']:.2f}–{i['high']:.2f} ({i['method']})"
            assert (
                f"| {name} | {metric} | {value:.2f} | {i['se']:.2f} | {ci} | {card_text} | {i['n']} |"
                in report
            )
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG" and png.width > 100
    return results


def test_every_suite_sample_runs_clean_against_the_demo_server(demo: ServerProcess, tmp_path: Path) -> None:
    """What the demo model cannot take (tools, images) is not applicable, with the server's refusal."""
    out = tmp_path / "demo"
    server = ["--endpoint", demo.url, "--judge-endpoint", demo.url]
    eval_cli("all", *server, "--sample", "--limit", "1", "--max-tokens", "8", "--samples", "1", "--out", out)
    refused = {"bfcl": "tools", "docvqa": "images", "chartqa": "images"}
    results = check_outputs(out, list(SUITES), refused=refused)
    assert results["suites"]["simpleqa"]["settings"]["judge"] == results["model"]
    assert results["context"] == {"length": 2048, "source": "the endpoint's /v1/models", "uncounted": None}


def test_the_judge_serves_every_endpoint_of_a_comparison(demo: ServerProcess, tmp_path: Path) -> None:
    """One command, two endpoints, one judge: each run asks it through a client of its own."""
    out = tmp_path / "judged"
    args = ["simpleqa", "--sample", "--limit", "2", "--max-tokens", "8", "--judge-endpoint", demo.url]
    eval_cli(*args, "--endpoint", demo.url, "--endpoint", f"{demo.url}/v1", "--out", out)
    for run in ("endpoint-1", "endpoint-2"):
        suite = json.loads((out / run / "results.json").read_text())["suites"]["simpleqa"]
        assert suite["failures"] == {} and len(suite["records"]) == 2, suite["failures"]
    (c,) = json.loads((out / "compare.json").read_text())["comparisons"]
    assert c["suites"]["simpleqa"]["n"] == 2 and c["suites"]["simpleqa"]["metrics"]


def test_a_suite_asking_more_than_the_context_is_fitted_to_it(tmp_path: Path) -> None:
    """loops asks 8192 new tokens; our in-process demo with a 160-token context cuts each request
    to what its prompt leaves (counted by /tokenize), so every item runs and the rates are reported."""
    out = tmp_path / "short"
    model = ["--max-model-len", "160", "--kv-cache-memory", "0.05"]
    eval_cli("loops", "--sample", "--limit", "1", *model, "--out", out)
    results = check_outputs(out, ["loops"])
    suite = results["suites"]["loops"]
    assert suite["fitted"] == 4 and results["context"]["length"] == 160  # 1 item x 4 conditions
    assert all(info["completion_tokens"] <= 160 - 30 for r in suite["records"] for info in r["info"].values())
    assert "max_tokens cut to the context on 4 requests" in (out / "report.md").read_text()


def test_failed_items_are_reported_and_the_run_goes_on(demo: ServerProcess, tmp_path: Path) -> None:
    """A temperature the server refuses: every gpqa request is a 400."""
    out = tmp_path / "failing"
    args = ["gpqa", "--sample", "--limit", "2", "--endpoint", demo.url, "--temperature", "5"]
    done = eval_cli(*args, "--out", out)  # exits 0: failed items are results too
    suite = json.loads((out / "results.json").read_text())["suites"]["gpqa"]
    assert len(suite["failures"]) == 2 and suite["records"] == []
    assert all("400" in error and "temperature" in error for error in suite["failures"].values())
    assert "2 failed and left out of the scores" in (out / "report.md").read_text()
    assert f"gpqa item {sorted(suite['failures'])[0]} failed" in done.stderr
    assert (out / "cache.jsonl").read_text() == ""  # nothing cached, so a rerun tries them again


def test_tool_and_image_suites_run_in_process_on_the_tiny_mistral(tiny_mistral: Path, tmp_path: Path) -> None:
    """--model starts our server in this process; the suites the demo cannot take (tools, images)
    run clean here; simpleqa without a judge is skipped, not failed; --chat-only switches mmlu to
    its generative variant."""
    names = [*NEED_TINY, "simpleqa", "mmlu"]  # the text suites run on the demo server above
    out = tmp_path / "tiny"
    model = ["--model", tiny_mistral, "--dtype", "float32", "--kv-cache-memory", "0.05"]
    done = eval_cli(
        *names,
        *model,
        "--sample",
        "--limit",
        "1",
        "--max-tokens",
        "8",
        "--samples",
        "1",
        "--chat-only",
        "--out",
        out,
    )
    results = check_outputs(out, names, skipped=("simpleqa",))
    assert results["suites"]["mmlu"]["settings"]["mode"] == "generative"
    assert "| docvqa | anls |" in done.stdout  # the table is printed too


def test_a_killed_run_resumes_without_redoing_finished_items(demo: ServerProcess, tmp_path: Path) -> None:
    """MMLU's log-likelihood scoring is greedy by nature and never reuses cached prefixes, so two
    runs score identically however the server's cache was warmed."""
    args = ["mmlu", "--sample", "--limit", "2", "--endpoint", demo.url, "--concurrency", "1"]
    total = 2
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cache = killed / "cache.jsonl"
    deadline = time.monotonic() + 300
    while not (cache.exists() and cache.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    finished = cache.read_text().count("\n")
    assert 1 <= finished < total and not (killed / "results.json").exists()

    eval_cli(*args, "--out", killed)
    resumed = json.loads((killed / "results.json").read_text())["suites"]["mmlu"]
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert resumed["cached"] == finished and len(resumed["records"]) == total
    ids = sorted(e["record"]["id"] for e in lines)
    assert ids == sorted(r["id"] for r in resumed["records"])  # each item cached once: none redone

    eval_cli(*args, "--out", tmp_path / "whole")
    whole = check_outputs(tmp_path / "whole", ["mmlu"])["suites"]["mmlu"]
    assert whole["cached"] == 0 and resumed["metrics"] == whole["metrics"]
    assert [r["answer"] for r in resumed["records"]] == [r["answer"] for r in whole["records"]]
