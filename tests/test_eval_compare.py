"""Scores you can trust: intervals and comparisons checked against hand computations, on runs
against stub OpenAI endpoints written here whose every answer is known; suites fitted to a short
context; a capability the endpoint refuses reported as not applicable."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_evals import eval_cli

from levante.evals.stats import mcnemar_exact, wilson
from levante.evals.suite import Options, Record, suite_class
from levante.evals.uncertainty import differences, intervals, summary_of

ITEMS = suite_class("mmlu")(Options(chat_only=True)).load(None, sample=True)  # 8 items, golds known
RIGHT = {"a": {0, 1, 2, 3, 4, 5}, "b": {0, 1, 6}}  # which items each stub answers correctly


class Stub(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint that answers MMLU's questions right or wrong as told: the
    model under test, with every answer known in advance."""

    def __init__(self, right: set[int]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.right = right
        self.questions = {item.data["question"]: (i, item.data["answer"]) for i, item in enumerate(ITEMS)}
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.reply(
                200, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "test"}]}
            )
        else:
            self.reply(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.reply(404, {"error": {"message": f"no {self.path} here", "type": "not_found"}})
            return
        question = body["messages"][-1]["content"].rsplit("\n\n", 1)[1].split("\n")[0]
        index, gold = self.server.questions[question]
        letter = gold if index in self.server.right else "ABCD"[("ABCD".index(gold) + 1) % 4]
        message = {"role": "assistant", "content": f"{letter}. (stub)"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        self.reply(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "stub",
                "choices": [choice],
                "usage": usage,
            },
        )


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, Stub]]:
    servers = {name: Stub(right) for name, right in RIGHT.items()}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()
    yield servers
    for s in servers.values():
        s.shutdown()


def bootstrap_by_hand(x: list[float], y: list[float]) -> tuple[float, float]:
    """The documented procedure, written out: 2000 resamples of the items from numpy's PCG64 seeded
    0, each the mean of B − A in points; the 2.5th and 97.5th percentiles."""
    n = len(x)
    rows = np.random.default_rng(0).integers(0, n, size=(2000, n))
    d = np.array(y) - np.array(x)
    means = [100 * sum(d[i] for i in row) / n for row in rows]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def test_two_endpoints_on_the_same_items_compared(stubs: dict[str, Stub], tmp_path: Path) -> None:
    out = tmp_path / "ab"
    args = ["mmlu", "--sample", "--chat-only", "--endpoint", stubs["a"].url, "--endpoint", stubs["b"].url]
    done = eval_cli(*args, "--out", out)
    compared = json.loads((out / "compare.json").read_text())
    (c,) = compared["comparisons"]
    assert (c["a"], c["b"]) == ("endpoint-1", "endpoint-2")
    accuracy = c["suites"]["mmlu"]["metrics"]["accuracy"]
    x = [float(i in RIGHT["a"]) for i in range(8)]
    y = [float(i in RIGHT["b"]) for i in range(8)]
    assert (accuracy["a"], accuracy["b"], accuracy["diff"], accuracy["n"]) == (75.0, 37.5, -37.5, 8)
    # McNemar by hand: A alone right on 4 items, B alone on 1; P(a split as uneven of 5 coin flips)
    assert (accuracy["a_only"], accuracy["b_only"]) == (4, 1)
    assert accuracy["p_mcnemar"] == pytest.approx(2 * (math.comb(5, 0) + math.comb(5, 1)) / 2**5)
    low, high = bootstrap_by_hand(x, y)
    assert (accuracy["low"], accuracy["high"]) == (pytest.approx(low), pytest.approx(high))
    assert accuracy["significant"] == (high < 0)
    flipped = c["suites"]["mmlu"]["flipped"]["accuracy"]
    assert sorted(f["id"] for f in flipped) == sorted(ITEMS[i].id for i in (2, 3, 4, 5, 6))
    assert all(f["a_answer"].endswith("(stub)") and f["b_answer"].endswith("(stub)") for f in flipped)
    report = (out / "compare.md").read_text()
    mark = " *" if high < 0 else ""
    assert (
        f"| mmlu | accuracy | 75.00 | 37.50 | -37.50{mark} | {low:+.2f} to {high:+.2f} | 0.375 | 8 |"
        in report
    )
    assert f"`{ITEMS[6].id}`: A 0 “" in report and "### Items that flipped" in report
    assert report in done.stdout and (out / "compare.png").stat().st_size > 1000
    # each run's own report: the score with its Wilson interval, by hand
    w_low, w_high = wilson(6, 8)
    p = 6 / 8
    centre = (p + 1.96**2 / 16) / (1 + 1.96**2 / 8)
    assert w_low == pytest.approx(
        100 * (centre - 1.96 / (1 + 1.96**2 / 8) * math.sqrt(p * (1 - p) / 8 + 1.96**2 / 256)), abs=0.05
    )
    se = 100 * math.sqrt(p * (1 - p) / 8)
    row = f"| mmlu | accuracy | 75.00 | {se:.2f} | {w_low:.2f}–{w_high:.2f} (wilson) | 80.50 | 8 |"
    assert row in (out / "endpoint-1" / "report.md").read_text()


def test_runs_on_different_items_compare_their_intersection(stubs: dict[str, Stub], tmp_path: Path) -> None:
    eval_cli("mmlu", "--sample", "--chat-only", "--endpoint", stubs["a"].url, "--out", tmp_path / "full")
    five = [
        "--limit",
        "5",
        "--context-length",
        "64",
        "--out",
        tmp_path / "five",
    ]  # a context it cannot count in
    eval_cli("mmlu", "--sample", "--chat-only", "--endpoint", stubs["b"].url, *five)
    context = json.loads((tmp_path / "five" / "results.json").read_text())["context"]
    assert context["length"] == 64 and context["source"] == "--context-length"
    assert context["uncounted"].startswith(f"{stubs['b'].url.removesuffix('/v1')}/tokenize: 404")
    assert "Prompts could not be counted, so nothing was cut" in (tmp_path / "five" / "report.md").read_text()
    done = eval_cli("compare", tmp_path / "full", tmp_path / "five", "--out", tmp_path / "cmp")
    (c,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["comparisons"]
    suite = c["suites"]["mmlu"]
    assert suite["n"] == 5 and suite["metrics"]["accuracy"]["n"] == 5
    assert suite["notes"][0] == "compared on the 5 items both runs scored (A has 3 more, B 0 more)"
    assert (suite["metrics"]["accuracy"]["a"], suite["metrics"]["accuracy"]["b"]) == (100.0, 40.0)
    assert "compared on the 5 items both runs scored" in done.stdout
    bad = eval_cli_fails("compare", tmp_path / "full", tmp_path / "nowhere")
    assert "nowhere: no such run" in bad
    bad = eval_cli_fails("compare", tmp_path / "full", tmp_path / "full" / "report.md")
    assert "report.md: not the results.json of a levante eval run" in bad
    assert "unknown suite 'mmlux'" in eval_cli_fails("mmlux", "--sample")


def eval_cli_fails(*args: str | Path) -> str:
    import subprocess

    from test_evals import CLI

    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    return done.stderr


def record(i: int, **scores: float) -> Record:
    return Record(str(i), "", "", scores, {})


def test_intervals_use_the_closed_form_where_the_metric_is_a_mean() -> None:
    binary = [record(i, accuracy=float(i < 3)) for i in range(10)]
    (found,) = intervals(summary_of("mmlu"), binary, {"accuracy": 30.0}).values()
    assert found.method == "wilson" and (found.low, found.high) == pytest.approx(wilson(3, 10))
    assert found.se == pytest.approx(100 * math.sqrt(0.3 * 0.7 / 10))
    partial = [record(i, anls=v) for i, v in enumerate([0.2, 0.5, 1.0, 0.9])]
    (found,) = intervals(summary_of("docvqa"), partial, {"anls": 65.0}).values()
    se = 100 * float(np.std([0.2, 0.5, 1.0, 0.9], ddof=1)) / 2
    assert (
        found.method == "normal"
        and found.se == pytest.approx(se)
        and found.low == pytest.approx(65 - 1.959964 * se)
        and found.high == 100.0  # clipped
    )


def test_a_summary_that_is_no_mean_is_bootstrapped_by_the_suite_itself() -> None:
    """BFCL's overall is the mean of its categories' accuracies, not of its items."""
    records = [
        Record(str(i), "", "", {"correct": v, c: v}, {"category": c})
        for i, (c, v) in enumerate(
            [("simple_python", 1.0), ("simple_python", 1.0), ("simple_python", 0.0), ("irrelevance", 0.0)]
        )
    ]
    summary = summary_of("bfcl")(records)
    assert summary["overall"] == pytest.approx((200 / 3 + 0) / 2)
    found = intervals(summary_of("bfcl"), records, summary)
    assert found["overall"].method == "bootstrap" and found["simple_python"].method == "wilson"
    assert found["simple_python"].n == 3 and found["irrelevance"].n == 1 and found["overall"].n == 4
    flipped = [
        Record(
            r.id,
            "",
            "",
            {"correct": 1 - r.scores["correct"], r.info["category"]: 1 - r.scores["correct"]},
            r.info,
        )
        for r in records
    ]
    diffs = differences(summary_of("bfcl"), records, flipped)
    assert (
        diffs["overall"].method == "paired bootstrap of the suite's summary"
        and diffs["overall"].p_mcnemar is None
    )
    assert diffs["irrelevance"].diff == 100.0 and diffs["irrelevance"].p_mcnemar == 1.0


def test_mcnemar_and_wilson_edges() -> None:
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert wilson(0, 2)[0] == 0.0 and wilson(2, 2)[1] == 100.0
    assert re.fullmatch(r"\d+\.\d+", f"{wilson(1, 3)[0]:.2f}")
