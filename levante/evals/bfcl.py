"""BFCL (Berkeley Function Calling Leaderboard v4), the single-turn categories that need no outside
service, asked through chat `tools` and scored by matching the returned calls against BFCL's
possible answers, following its AST checker's rules:

- the right functions, as many calls as expected; parallel calls matched in any order;
- every required parameter present, none the function or the answer does not know, and an omitted
  one allowed only where `""` is among its possible answers;
- each value of the declared type (an int is accepted for a float, a list for a tuple; a value of
  the answers' own type is accepted too: BFCL writes variable names as strings) and among the
  possible answers: strings compared without spaces and `,./-_*^`, case-insensitively, with `'`
  read as `"`; lists element by element; dict answers give possible values per key, recursively;
- irrelevance: correct iff the model makes no call; live_relevance: iff it makes one.

Where BFCL checks only one level deep (nested lists, int inside a float list) we apply the same
rules recursively. The data ships in the PyPI package bfcl-eval; its folder is found without
importing the package, whose imports need dependencies we do not install."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletionMessage

from levante.errors import LevanteError
from levante.evals.ifeval import Refusal, ask, read_jsonl
from levante.evals.suite import SAMPLES, DataMissing, Endpoint, Item, Record, Suite, greedy_params

NO_CALL = ("irrelevance", "live_irrelevance")
ANY_CALL = ("live_relevance",)
CATEGORIES = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    *NO_CALL,
    *ANY_CALL,
)
JSON_TYPES = {
    "dict": "object",
    "object": "object",
    "float": "number",
    "number": "number",
    "integer": "integer",
    "string": "string",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
    "any": "string",  # BFCL's own mapping; its answers for `any` are strings
}
SCHEMA_KEYWORDS = ("description", "default", "format", "minimum", "maximum", "minItems", "maxItems")
"""What BFCL's docs use that JSON Schema knows (enum is placed by `json_schema`); BFCL's own
`optional` flag is dropped."""
PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "float": (int, float),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "tuple": (list,),  # JSON has no tuples
    "dict": (dict,),
    "object": (dict,),
}


def bfcl_data() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing("BFCL's data ships in the PyPI package bfcl-eval: pip install --no-deps bfcl-eval")
    return Path(spec.submodule_search_locations[0]) / "data"


def category_of(item_id: str) -> str:
    """BFCL ids start with their category (`live_parallel_multiple_3-2-0`); the longest wins."""
    for category in sorted(CATEGORIES, key=len, reverse=True):
        if item_id.startswith(category + "_"):
            return category
    raise LevanteError(f"BFCL id {item_id!r} names none of the categories {CATEGORIES}")


def parse(entry: dict[str, Any], answer: list[dict[str, Any]] | None, where: str) -> Item:
    """A question entry and its possible answer (None for the (ir)relevance categories)."""
    try:
        item_id, turns, functions = entry["id"], entry["question"], entry["function"]
    except KeyError as e:
        raise LevanteError(f"{where}: missing field {e.args[0]!r}") from None
    category = category_of(item_id)
    if len(turns) != 1:
        raise LevanteError(f"{where}: {item_id} has {len(turns)} turns; only single-turn entries are scored")
    if (answer is None) != (category in NO_CALL + ANY_CALL):
        raise LevanteError(f"{where}: {item_id} {'lacks' if answer is None else 'has'} a possible answer")
    names = {f["name"] for f in functions}
    for call in answer or []:
        if not names.issuperset(call):
            raise LevanteError(f"{where}: {item_id}'s answer calls {list(call)}, not among {sorted(names)}")
    data = {"category": category, "messages": turns[0], "functions": functions, "ground_truth": answer}
    return Item(item_id, data)


def load_category(folder: Path, category: str) -> list[Item]:
    """BFCL's files for one category; possible answers are joined to questions by id."""
    path = folder / f"BFCL_v4_{category}.json"
    if not path.is_file():
        raise DataMissing(f"{path} not found: is bfcl-eval installed whole?")
    answers: dict[str, Any] = {}
    if category not in NO_CALL + ANY_CALL:
        answer_path = folder / "possible_answer" / path.name
        if not answer_path.is_file():
            raise DataMissing(f"{answer_path} not found: is bfcl-eval installed whole?")
        answers = {a["id"]: a["ground_truth"] for a in read_jsonl(answer_path)}
    items = []
    for entry in read_jsonl(path):
        if answers and entry.get("id") not in answers:
            raise LevanteError(f"{folder / 'possible_answer' / path.name}: no answer for {entry.get('id')!r}")
        items.append(parse(entry, answers.get(entry.get("id")), str(path)))
    return items


# ---- BFCL function docs as OpenAI tools ---------------------------------------------------------


def json_schema(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """A BFCL parameter doc (Python type names, `optional` flags) as JSON Schema. An enum goes
    where its values fit: a few BFCL docs put an array's item values on the array, or give
    strings for an integer (then it is dropped), and a schema nothing satisfies gets refused."""
    kind = doc.get("type", "string")  # BFCL reads an untyped parameter as a string
    if kind not in JSON_TYPES:
        raise LevanteError(f"{where}: type {kind!r} has no JSON Schema equivalent")
    schema = {"type": JSON_TYPES[kind], **{k: doc[k] for k in SCHEMA_KEYWORDS if k in doc}}
    if "properties" in doc:
        schema["properties"] = {k: json_schema(v, f"{where}.{k}") for k, v in doc["properties"].items()}
    if isinstance(doc.get("required"), list):
        schema["required"] = doc["required"]
    if "items" in doc:
        schema["items"] = json_schema(doc["items"], f"{where}[]")
    for target in (schema, schema.get("items")) if "enum" in doc else ():
        if target is not None and (values := [v for v in doc["enum"] if conforms(v, target)]):
            target["enum"] = values
            break
    return schema


def tool_names(functions: list[dict[str, Any]]) -> dict[str, str]:
    """Tool name → BFCL name. OpenAI names allow only `[A-Za-z0-9_-]{1,64}`, so dots and the like
    become `_` (as BFCL's own OpenAI handler does), with a suffix should two names collide."""
    names: dict[str, str] = {}
    for f in functions:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", f["name"])[:64]
        name = base
        for n in itertools.count(2):
            if name not in names:
                break
            name = f"{base[:60]}_{n}"
        names[name] = f["name"]
    return names


def tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {v: k for k, v in tool_names(functions).items()}
    return [
        {
            "type": "function",
            "function": {
                "name": by_name[f["name"]],
                "description": f.get("description", ""),
                "parameters": json_schema(f["parameters"], f"function {f['name']}"),
            },
        }
        for f in functions
    ]


# ---- matching ------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def same(value: Any, expected: Any) -> bool:
    """`value` equals one possible answer. A dict answer maps each key to its possible values."""
    if isinstance(expected, dict):
        return (
            isinstance(value, dict)
            and all(k in expected and matches(v, expected[k]) for k, v in value.items())
            and all(k in value or optional(alts) for k, alts in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(value, list)
            and len(value) == len(expected)
            and all(same(v, e) for v, e in zip(value, expected, strict=True))
        )
    if isinstance(expected, str):
        return isinstance(value, str) and normalize(value) == normalize(expected)
    if isinstance(expected, bool) or isinstance(value, bool):
        return type(value) is type(expected) and value == expected
    return value == expected  # numbers (5 == 5.0) and None


def alternatives(answer: Any) -> list[Any]:
    return answer if isinstance(answer, list) else [answer]


def matches(value: Any, answer: Any) -> bool:
    return any(same(value, a) for a in alternatives(answer))


def optional(answer: Any) -> bool:
    return "" in alternatives(answer)


def conforms(value: Any, doc: dict[str, Any]) -> bool:
    kind = doc.get("type", "string")
    if kind == "any":
        return True
    if isinstance(value, bool) != (kind == "boolean") or not isinstance(value, PYTHON_TYPES[kind]):
        return False
    return not (isinstance(value, list) and "items" in doc) or all(conforms(v, doc["items"]) for v in value)


def check_call(doc: dict[str, Any], expected: dict[str, Any], call: dict[str, Any]) -> str | None:
    """Why `call` ({name: arguments}) is not the `expected` one ({name: {param: answers}}), or None."""
    ((name, answer),) = expected.items()
    ((called, args),) = call.items()
    if called != name:
        return f"called {called}, expected {name}"
    params = doc["parameters"].get("properties", {})
    for param in doc["parameters"].get("required", []):
        if param not in args:
            return f"{name}: required parameter {param!r} missing"
    for param, value in args.items():
        if param not in params or param not in answer:
            return f"{name}: unexpected parameter {param!r}"
        answers = answer[param]
        if not conforms(value, params[param]) and not any(
            type(value) is type(a) for a in alternatives(answers) if a != ""
        ):
            return f"{name}: {param}={value!r} is not of type {params[param].get('type', 'string')}"
        if not matches(value, answers):
            return f"{name}: {param}={value!r} is not among {answers!r}"
    for param, answers in answer.items():
        if param not in args and not optional(answers):
            return f"{name}: parameter {param!r} missing (it is not optional here)"
    return None


def assignable(fits: list[list[bool]], used: frozenset[int] = frozenset()) -> bool:
    """Whether every expected call (row) can take its own matching call (column)."""
    if len(used) == len(fits):
        return True
    row = fits[len(used)]
    return any(fit and j not in used and assignable(fits, used | {j}) for j, fit in enumerate(row))


def check_calls(
    functions: list[dict[str, Any]], calls: list[dict[str, Any]], ground_truth: list[dict[str, Any]]
) -> str | None:
    """Why `calls` do not answer the question, or None: the same number of calls as expected, and
    a one-to-one match between them, in any order."""
    if len(calls) != len(ground_truth):
        return f"{len(calls)} call(s), expected {len(ground_truth)}"
    docs = {f["name"]: f for f in functions}
    errors = [[check_call(docs[next(iter(e))], e, c) for c in calls] for e in ground_truth]
    if assignable([[error is None for error in row] for row in errors]):
        return None
    for row in errors:
        if all(row):
            return row[0] if len(row) == 1 else "no call matches: " + " | ".join(row)
    return "no one-to-one match: some calls fit several expected ones, others none"


def calls_of(tool_calls: list[Any], names: dict[str, str]) -> list[dict[str, Any]]:
    """The answer's calls as {BFCL name: arguments}; ValueError if arguments are not a JSON object."""
    calls = []
    for call in tool_calls:
        args = json.loads(call.function.arguments or "{}")
        if not isinstance(args, dict):
            raise ValueError(f"arguments of {call.function.name} are not a JSON object")
        calls.append({names.get(call.function.name, call.function.name): args})
    return calls


class BFCL(Suite):
    name = "bfcl"
    data_files = "none: BFCL's data ships in the PyPI package bfcl-eval (pip install --no-deps bfcl-eval)"

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        """All supported categories, interleaved one item of each at a time, so that a --limit
        run still measures every category."""
        if sample:
            path = SAMPLES / "bfcl.jsonl"
            return [parse(e, e.get("ground_truth"), f"{path} {e.get('id')}") for e in read_jsonl(path)]
        folder = bfcl_data()
        groups = [load_category(folder, category) for category in CATEGORIES]
        return [item for row in itertools.zip_longest(*groups) for item in row if item is not None]

    def needs(self) -> tuple[str, ...]:
        return ("tools",)

    def settings(self) -> dict[str, Any]:
        return greedy_params(self.options, 1024)

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        """A refused request (a model that cannot take tools, a prompt too long) is a wrong
        answer, irrelevance included: declining to be asked is not declining to call."""
        data = item.data
        reply = await ask(endpoint, data["messages"], tools=tools(data["functions"]), **self.settings())
        if isinstance(reply, Refusal):
            info = {"category": data["category"], "error": reply.message}
            return Record(item.id, data["messages"], None, {"correct": 0.0, data["category"]: 0.0}, info)
        return self.score(item, reply.choices[0].message)

    def score(self, item: Item, message: ChatCompletionMessage) -> Record:
        """Undecodable arguments fail the item, except in irrelevance where, as in BFCL, a call
        that does not decode is no call."""
        data, category = item.data, item.data["category"]
        answer: dict[str, Any] = {"content": message.content}
        error = None
        try:
            answer["calls"] = calls = calls_of(message.tool_calls or [], tool_names(data["functions"]))
        except ValueError as e:  # json's JSONDecodeError included
            answer["calls"] = [c.model_dump() for c in message.tool_calls or []]
            calls, error = [], f"undecodable call: {e}"
        if category in NO_CALL:
            error = f"called {[next(iter(c)) for c in calls]} where no function fits" if calls else None
        elif category in ANY_CALL:
            error = None if calls else error or "no call"
        else:
            error = error or check_calls(data["functions"], calls, data["ground_truth"])
        info = {"category": category} | ({"error": error} if error else {})
        scores = {"correct": float(error is None), category: float(error is None)}  # n per category
        return Record(item.id, data["messages"], answer, scores, info)

    def summarize(self, records: list[Record]) -> dict[str, float]:
        """Accuracy per category, and `overall` as their unweighted mean (BFCL's own summary
        weighs groups; one big category such as live_multiple should not drown the rest)."""
        by_category: dict[str, list[float]] = {}
        for r in records:
            by_category.setdefault(r.info["category"], []).append(r.scores["correct"])
        per = {c: 100 * sum(v) / len(v) for c in CATEGORIES if (v := by_category.get(c))}
        return {"overall": sum(per.values()) / len(per), **per} if per else {}
