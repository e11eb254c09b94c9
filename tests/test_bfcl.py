"""BFCL: AST matching against hand-worked calls, scoring of real OpenAI message objects, BFCL's
function docs as OpenAI tools (real entries from the installed data), and loading."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openai.types.chat import ChatCompletionMessage, ChatCompletionMessageToolCall

from levante.engine.grammar import schema_error
from levante.errors import LevanteError
from levante.evals.bfcl import (
    ANY_CALL,
    BFCL,
    CATEGORIES,
    NO_CALL,
    bfcl_data,
    category_of,
    check_call,
    check_calls,
    load_category,
    normalize,
    tool_names,
    tools,
)
from levante.evals.suite import Options

TRIP = {
    "name": "travel.plan",
    "description": "Plan a trip.",
    "parameters": {
        "type": "dict",
        "properties": {
            "city": {"type": "string", "description": "Destination."},
            "days": {"type": "integer", "description": "Length."},
            "budget": {"type": "float", "description": "Euros."},
            "window": {"type": "tuple", "items": {"type": "integer"}, "description": "Hours."},
            "pets": {"type": "boolean", "description": "Bringing pets.", "default": False},
            "room": {
                "type": "dict",
                "description": "Room wishes.",
                "properties": {"beds": {"type": "integer"}, "view": {"type": "string"}},
            },
            "stops": {"type": "array", "items": {"type": "float"}, "description": "Waypoints."},
        },
        "required": ["city", "days"],
    },
}
ANSWER = {
    "travel.plan": {
        "city": ["New York, NY", "NYC"],
        "days": [3],
        "budget": [1200.0, ""],
        "window": [[9, 17], ""],
        "pets": ["", False],
        "room": [{"beds": [2], "view": ["sea", ""]}, ""],
        "stops": [[1.5, 2.0], ""],
    }
}


def verdict(**args: object) -> str | None:
    return check_call(TRIP, ANSWER, {"travel.plan": args})


def test_values_types_and_optional_parameters() -> None:
    assert verdict(city="NYC", days=3) is None  # every optional parameter omitted where "" allows
    assert verdict(city="new york ny", days=3, budget=1200) is None  # normalised string, int for float
    assert verdict(city="New York, NY", days=3, window=[9, 17], pets=False, room={"beds": 2}) is None
    assert verdict(city="NYC", days=3, stops=[1.5, 2]) is None  # ints inside a float list too
    assert "required parameter 'days' missing" in verdict(city="NYC")
    assert "days=3.0 is not of type integer" in verdict(city="NYC", days=3.0)
    assert "days=True is not of type integer" in verdict(city="NYC", days=True)
    assert "budget='1200' is not of type float" in verdict(city="NYC", days=3, budget="1200")
    assert "city='Boston' is not among" in verdict(city="Boston", days=3)
    assert "unexpected parameter 'nights'" in verdict(city="NYC", days=3, nights=2)
    assert "window=[17, 9] is not among" in verdict(city="NYC", days=3, window=[17, 9])
    assert "room={'beds': 2, 'view': 'park'}" in verdict(city="NYC", days=3, room={"beds": 2, "view": "park"})
    assert "room={'view': 'sea'}" in verdict(city="NYC", days=3, room={"view": "sea"})  # beds not optional
    assert check_call(TRIP, ANSWER, {"travel_plan": {"city": "NYC", "days": 3}}) is not None


def test_parameter_the_answer_does_not_allow_is_unexpected() -> None:
    """As in BFCL: a documented parameter absent from the possible answer may not be passed."""
    answer = {"travel.plan": {"city": ["NYC"], "days": [3]}}
    assert "unexpected parameter 'pets'" in check_call(
        TRIP, answer, {"travel.plan": {"city": "NYC", "days": 3, "pets": False}}
    )
    required_pets = {"travel.plan": {**answer["travel.plan"], "pets": [True]}}
    error = check_call(TRIP, required_pets, {"travel.plan": {"city": "NYC", "days": 3}})
    assert "parameter 'pets' missing" in error


def test_answer_of_another_type_is_a_variable_name() -> None:
    """BFCL writes a variable the model should pass by name as a string, whatever the type."""
    answer = {"travel.plan": {"city": ["NYC"], "days": ["trip_length"]}}
    assert check_call(TRIP, answer, {"travel.plan": {"city": "NYC", "days": "trip_length"}}) is None
    assert check_call(TRIP, answer, {"travel.plan": {"city": "NYC", "days": 3}}) is not None


def test_normalize() -> None:
    assert normalize("April 1, 2024") == normalize("april 1 2024") == "april12024"
    assert normalize("it's") == 'it"s'
    assert normalize("a-b_c/d.e*f^g") == "abcdefg"


def call(name: str, **args: object) -> dict:
    return {name: args}


def test_parallel_calls_match_in_any_order() -> None:
    fn = {
        "name": "tide",
        "parameters": {"type": "dict", "properties": {"port": {"type": "string"}}, "required": ["port"]},
    }
    truth = [call("tide", port=["Brest", "Cherbourg"]), call("tide", port=["Brest"])]
    # the first expected call fits both calls, and must take the second: taking the first that
    # fits (as BFCL's checker does) would leave the second expected call without a match
    assert check_calls([fn], [call("tide", port="Brest"), call("tide", port="Cherbourg")], truth) is None
    assert check_calls([fn], [call("tide", port="Cherbourg"), call("tide", port="Brest")], truth) is None
    assert (
        check_calls([fn], [call("tide", port="Cherbourg"), call("tide", port="Cherbourg")], truth) is not None
    )
    assert check_calls([fn], [call("tide", port="Brest")], truth) == "1 call(s), expected 2"
    twice_brest = [call("tide", port=["Brest"]), call("tide", port=["Brest"])]
    error = check_calls([fn], [call("tide", port="Brest"), call("tide", port="Paris")], twice_brest)
    assert error.startswith("no one-to-one match")
    paris_rome = [call("tide", port=["Paris"]), call("tide", port=["Rome"])]
    error = check_calls([fn], [call("tide", port="Brest"), call("tide", port="Paris")], paris_rome)
    rome = "tide: port={!r} is not among ['Rome']"
    assert error == "no call matches: " + rome.format("Brest") + " | " + rome.format("Paris")


def message(*calls: tuple[str, str], content: str | None = None) -> ChatCompletionMessage:
    tool_calls = [
        ChatCompletionMessageToolCall(id=f"c{i}", type="function", function={"name": n, "arguments": a})
        for i, (n, a) in enumerate(calls)
    ]
    return ChatCompletionMessage(role="assistant", content=content, tool_calls=tool_calls or None)


def test_scoring_a_message_maps_tool_names_back_and_handles_irrelevance() -> None:
    suite = BFCL(Options())
    sample = suite.load(None, sample=True)
    items = {item.data["category"]: item for item in sample}
    assert 0 < len(sample) <= 10 and len(items) == len(sample)
    simple, irrelevant = items["simple_python"], items["irrelevance"]
    assert tool_names(simple.data["functions"]) == {"kitchen_boil_water": "kitchen.boil_water"}

    right = suite.score(simple, message(("kitchen_boil_water", '{"volume": 1.5}')))
    assert right.scores == {"correct": 1.0, "simple_python": 1.0}  # the category's own: its n
    assert right.answer["calls"] == [{"kitchen.boil_water": {"volume": 1.5}}]
    wrong = suite.score(simple, message(("kitchen_boil_water", '{"volume": 2}')))
    assert wrong.scores["correct"] == 0.0 and "volume=2 is not among" in wrong.info["error"]
    cut = suite.score(simple, message(("kitchen_boil_water", '{"volume": 1.')))
    assert cut.scores["correct"] == 0.0 and "undecodable" in cut.info["error"]
    assert suite.score(simple, message(content="Boiling now.")).scores["correct"] == 0.0

    assert suite.score(irrelevant, message(content="Michelangelo.")).scores["correct"] == 1.0
    called = message(("tide_table", '{"harbour": "Rome", "date": "1508-05-10"}'))
    assert suite.score(irrelevant, called).info["error"] == "called ['tide_table'] where no function fits"
    assert suite.score(items["live_relevance"], message(content="Sure!")).scores["correct"] == 0.0
    toast = message(("kitchen_toast", '{"slices": 1}'))
    assert suite.score(items["live_relevance"], toast).scores["correct"] == 1.0

    nested = items["live_simple"]  # a list of dicts and a dict, matched per key
    args = {
        "items": [{"name": "Croissants", "count": 3}, {"name": "baguette", "count": 1}],
        "pickup": {"time": "08:30", "name": "ana"},
    }
    assert suite.score(nested, message(("Bakery_order", json.dumps(args)))).scores["correct"] == 1.0


def test_summary_per_category_and_overall() -> None:
    suite = BFCL(Options())
    items = {item.data["category"]: item for item in suite.load(None, sample=True)}
    records = [
        suite.score(items["irrelevance"], message(content="No tool for that.")),
        suite.score(items["irrelevance"], message(("tide_table", '{"harbour": "Brest", "date": "today"}'))),
        suite.score(items["live_irrelevance"], message(content="Fine, thanks!")),
    ]
    assert suite.summarize(records) == {"overall": 75.0, "irrelevance": 50.0, "live_irrelevance": 100.0}


REAL = [
    "simple_python_0",
    "simple_python_83",
    "simple_python_109",
    "multiple_3",
    "parallel_multiple_1",
    "live_simple_71-35-0",
    "live_multiple_0-0-0",
    "live_relevance_8-8-0",
    "live_irrelevance_0-0-0",
]


def test_real_bfcl_docs_become_valid_tools() -> None:
    """Entries with dotted names, float/tuple/any/dict types, nested objects, and the data's odd
    enums (on an array, strings for an integer) give schemas the grammar engine compiles."""
    entries = {
        item.id: item for c in {category_of(i) for i in REAL} for item in load_category(bfcl_data(), c)
    }
    converted = {}
    for item_id in REAL:
        functions = entries[item_id].data["functions"]
        converted[item_id] = specs = tools(functions)
        assert set(tool_names(functions).values()) == {f["name"] for f in functions}
        for spec in specs:
            assert spec["type"] == "function"
            parameters = spec["function"]["parameters"]
            jsonschema.Draft202012Validator.check_schema(parameters)
            assert schema_error(parameters) is None, item_id
            text = json.dumps(parameters)
            for bfcl_only in ('"dict"', '"float"', '"tuple"', '"any"', '"optional"'):
                assert bfcl_only not in text, (item_id, bfcl_only)

    def properties(item_id: str, index: int = 0) -> dict:
        return converted[item_id][index]["function"]["parameters"]["properties"]

    coord = properties("simple_python_83")["coord1"]  # a tuple of floats
    assert (coord["type"], coord["items"]) == ("array", {"type": "number"})
    assert properties("simple_python_109")["data"]["type"] == "string"  # `any`, as BFCL maps it
    preferences = properties("live_multiple_0-0-0", 1)["new_preferences"]  # a dict with properties
    assert preferences["type"] == "object" and preferences["properties"]["size"]["type"] == "string"
    metrics = properties("live_simple_71-35-0")["metrics"]
    assert "enum" not in metrics and "trust" in metrics["items"]["enum"]  # BFCL put it on the array
    tickets = [
        p["number_of_tickets"]
        for spec in converted["live_relevance_8-8-0"]
        if "number_of_tickets" in (p := spec["function"]["parameters"]["properties"])
    ]
    assert tickets and "enum" not in tickets[0]  # strings '1'…'9' for an integer: dropped


def test_every_category_loads_with_answers_joined_by_id() -> None:
    items = BFCL(Options()).load(None, sample=False)
    assert [item.data["category"] for item in items[: len(CATEGORIES)]] == list(CATEGORIES)  # interleaved
    for category in CATEGORIES:
        mine = [item for item in items if item.data["category"] == category]
        assert mine and all(item.id.startswith(category + "_") for item in mine)
        for item in mine:
            names = {f["name"] for f in item.data["functions"]}
            truth = item.data["ground_truth"]
            assert (truth is None) == (category in NO_CALL + ANY_CALL)
            assert all(set(c) <= names for c in truth or [])


def write_category(folder: Path, questions: list[dict], answers: list[dict]) -> None:
    (folder / "possible_answer").mkdir(exist_ok=True)
    name = "BFCL_v4_simple_python.json"
    for path, entries in ((folder / name, questions), (folder / "possible_answer" / name, answers)):
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_answers_join_by_id_and_a_missing_one_is_named(tmp_path: Path) -> None:
    hi = [[{"role": "user", "content": "hi"}]]
    questions = [{"id": f"simple_python_{i}", "question": hi, "function": [TRIP]} for i in range(2)]
    answers = [{"id": f"simple_python_{i}", "ground_truth": [call("travel.plan", days=[i])]} for i in (1, 0)]
    write_category(tmp_path, questions, answers)
    items = load_category(tmp_path, "simple_python")
    assert [item.data["ground_truth"][0]["travel.plan"]["days"] for item in items] == [[0], [1]]
    write_category(tmp_path, questions, answers[:1])
    with pytest.raises(
        LevanteError, match=r"possible_answer/BFCL_v4_simple_python.json: no answer for 'simple_python_0'"
    ):
        load_category(tmp_path, "simple_python")
    write_category(
        tmp_path, questions, [{"id": a["id"], "ground_truth": [call("ghost", x=[1])]} for a in answers]
    )
    with pytest.raises(LevanteError, match=r"simple_python_0's answer calls \['ghost'\]"):
        load_category(tmp_path, "simple_python")
