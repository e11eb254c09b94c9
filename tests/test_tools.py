"""Function calling and structured output: the parser on hand-built token ids, and a real server
(tiny random Mistral3, so only the grammar can make its answers valid) driven by the openai client."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from servers import ServerProcess, post

from levante.api.tools import ToolCallParser, parse_answer
from levante.engine import SamplingParams
from levante.engine.sampler import SampleRow, sample
from levante.testing.tekken import write_tekken
from levante.tokenizer import Tokenizer, load_tokenizer
from levante.tokenizer.mistral import call_id

AUTH = {"Authorization": "Bearer sk-test"}
ASK = [{"role": "user", "content": "Use the tools."}]

# ---- the parser, on hand-built ids -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tekken")
    write_tekken(directory)
    return load_tokenizer(directory)


EOS = 2
CONTROL = {"[TOOL_CALLS]": 9, "[ARGS]": 32, "[CALL_ID]": 33}


def ids(tok: Tokenizer, *parts: str) -> list[int]:
    """Control tokens by name, text encoded as the model would write it."""
    out: list[int] = []
    for part in parts:
        out += [CONTROL[part]] if part in CONTROL else tok.encode(part, add_bos=False)
    return out


def streamed(tok: Tokenizer, names: frozenset[str], tokens: list[int]) -> tuple[str, list[dict[str, Any]]]:
    """Content and calls reassembled from deltas fed one token at a time, as a client would."""
    parser = ToolCallParser(tok, names)
    content, calls = "", []
    for i, t in enumerate(tokens):
        delta = parser.feed([t], final=i == len(tokens) - 1)
        content += delta.content
        for entry in delta.calls:
            if "id" in entry:
                assert entry["index"] == len(calls) and entry["type"] == "function"
                calls.append({"id": entry["id"], **entry["function"]})
            else:
                calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    return content, calls


NAMES = frozenset({"get_weather", "get_time"})


@pytest.mark.parametrize(
    ("name", "parts", "content", "calls"),
    [
        (
            "v11",
            ["[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": "Paris"}'],
            None,
            [("get_weather", '{"city": "Paris"}')],
        ),
        (
            "v11 with call id",
            ["[TOOL_CALLS]", "get_weather", "[CALL_ID]", "abcDEF123", "[ARGS]", '{"city": "Oslo"}'],
            None,
            [("get_weather", '{"city": "Oslo"}')],
        ),
        (
            "content then several calls, whitespace around the JSON",
            [
                "Let me look.",
                "[TOOL_CALLS]",
                " get_weather",
                "[ARGS]",
                ' {"city": "a b "} \n',
                "[TOOL_CALLS]",
                "get_time",
                "[ARGS]",
                '{"tz": "UTC"}',
            ],
            "Let me look.",
            [("get_weather", '{"city": "a b "}'), ("get_time", '{"tz": "UTC"}')],
        ),
        (
            "pre-v11 list",
            ["[TOOL_CALLS]", '[{"name": "get_time", "arguments": {"tz": "CET"}}, {"name": "get_weather"}]'],
            None,
            [("get_time", '{"tz": "CET"}'), ("get_weather", "{}")],
        ),
    ],
)
def test_parser_formats(
    tekken: Tokenizer, name: str, parts: list[str], content: str | None, calls: list[tuple[str, str]]
) -> None:
    tokens = [*ids(tekken, *parts), EOS]
    got_content, got_calls, reason = parse_answer(tekken, NAMES, tokens, "stop")
    assert reason == "tool_calls"
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id.isalnum() and len(c.id) == 9 for c in got_calls)
    if name == "v11 with call id":
        assert got_calls[0].id == "abcDEF123"
    # streamed token by token, the deltas reassemble to the same answer
    text, parts_calls = streamed(tekken, NAMES, tokens)
    assert text == (content or "")
    assert [(c["name"], c["arguments"]) for c in parts_calls] == calls


def test_parser_malformed_unknown_and_truncated(tekken: Tokenizer) -> None:
    broken = ids(tekken, "Hi", "[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": ')
    content, calls, reason = parse_answer(tekken, NAMES, broken, "stop")
    assert (content, calls, reason) == ('Higet_weather{"city": ', [], "stop")  # never control tokens
    # cut by max_tokens: returned as generated, and the reason says so
    content, calls, reason = parse_answer(tekken, NAMES, broken, "length")
    assert (content, reason) == ("Hi", "length")
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":')]
    unknown = ids(tekken, "[TOOL_CALLS]", "rm_rf", "[ARGS]", "{}")
    assert parse_answer(tekken, NAMES, unknown, "stop") == ("rm_rf{}", [], "stop")
    not_a_list = ids(tekken, "[TOOL_CALLS]", "oops")
    assert parse_answer(tekken, NAMES, not_a_list, "stop") == ("oops", [], "stop")


def test_sampler_mask_constrains_greedy_and_draws_but_logprobs_stay_raw() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(1000, dtype=torch.bool)
    allowed[[5, 77, 901]] = True
    rows = [
        SampleRow(
            SamplingParams(temperature=t, logprobs=0),
            [1],
            [],
            torch.Generator().manual_seed(1),
            frozenset({2}),
        )
        for t in (0.0, 1.0, 1.0)
    ]
    for row in rows:
        row.allowed = allowed
    samples = sample(logits, rows)
    assert samples[0].token == max((5, 77, 901), key=lambda t: logits[0, t])
    for i, smp in enumerate(samples):
        assert smp.token in (5, 77, 901)
        assert smp.logprob == pytest.approx(float(torch.log_softmax(logits[i], -1)[smp.token]), abs=1e-5)


# ---- generated schemas ---------------------------------------------------------------------------

WORDS = ["red", "green", "blue", "north", "south", "x", "y z", "café"]


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    """A bounded schema (strings, arrays and numbers have limits), so that a model with random
    weights, held to it by the grammar, finishes within a few dozen tokens."""
    kinds = ["enum", "string", "integer", "number", "boolean", "null", "array", "object", "anyOf"]
    kind = rng.choice(kinds if depth < 2 else kinds[:6])
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": -1, "maximum": rng.choice([1, 10, 1000])}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "array":
        return {
            "type": "array",
            "items": _value(rng, depth + 1),
            "minItems": 1,
            "maxItems": rng.randint(1, 3),
        }
    if kind == "object":
        return _object(rng, depth + 1)
    return {"anyOf": [_value(rng, depth + 1), _value(rng, depth + 1)]}


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    props = {f"{rng.choice(WORDS).split()[0]}_{i}": _value(rng, depth) for i in range(rng.randint(1, 4))}
    required = sorted(rng.sample(list(props), rng.randint(0, len(props))))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [_object(random.Random(seed), 0) for seed in range(24)]


def tool(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": f"{name} it", "parameters": schema}}


def chat(client: openai.OpenAI, stream: bool, **kw: Any) -> dict[str, Any]:
    """One choice as {content, tool_calls: [{id, name, arguments}], finish_reason}; streamed answers
    are reassembled from their deltas, checking the OpenAI shape on the way."""
    if not stream:
        choice = client.chat.completions.create(model="tiny", messages=ASK, **kw).choices[0]
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
        ]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, reason = "", [], None
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for entry in c.delta.tool_calls or []:
                if entry.id is not None:
                    assert entry.index == len(calls) and entry.type == "function" and entry.function.name
                    calls.append({"id": entry.id, "name": entry.function.name, "arguments": ""})
                calls[entry.index]["arguments"] += entry.function.arguments or ""
            reason = c.finish_reason or reason
    return {"content": content or None, "tool_calls": calls, "finish_reason": reason}


def assert_valid_calls(answer: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> None:
    assert answer["finish_reason"] == "tool_calls", answer
    assert answer["tool_calls"], answer
    for call in answer["tool_calls"]:
        assert len(call["id"]) == 9 and call["id"].isalnum()
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    assert "[TOOL_CALLS]" not in (answer["content"] or "")


@pytest.fixture(scope="module")
def tiny_client(tiny: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="sk-test", max_retries=0, timeout=300)


def run_all(jobs: list[Callable[[], None]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def test_generated_schemas_required_and_named_calls_validate(tiny_client: openai.OpenAI) -> None:
    def job(i: int, choice: str, stream: bool) -> Callable[[], None]:
        schemas = {f"tool_{i}": SCHEMAS[i], f"other_{i}": SCHEMAS[(i + 1) % len(SCHEMAS)]}
        named = {"type": "function", "function": {"name": f"tool_{i}"}}

        def run() -> None:
            answer = chat(
                tiny_client,
                stream,
                tools=[tool(name, schema) for name, schema in schemas.items()],
                tool_choice=named if choice == "named" else "required",
                parallel_tool_calls=False,  # greedy noise would go on calling until max_tokens
                max_tokens=300,
                temperature=0,
            )
            assert_valid_calls(answer, schemas)
            if choice == "named":
                assert {c["name"] for c in answer["tool_calls"]} == {f"tool_{i}"}

        return run

    # every schema both named and required; streamed and not alternating, so both modes see each choice
    run_all(
        [
            job(i, c, (i + k) % 2 == 1)
            for i in range(len(SCHEMAS))
            for k, c in enumerate(("named", "required"))
        ]
    )


def test_response_format_json_schema_and_json_object(tiny_client: openai.OpenAI, tekken: Tokenizer) -> None:
    # a free object's keys are unbounded strings: noise is nudged to an empty object instead
    close = {str(t): 30 for text in ("{}", "}") for t in tekken.encode(text, add_bos=False)}

    def job(schema: dict[str, Any] | None, stream: bool) -> Callable[[], None]:
        def run() -> None:
            fmt = (
                {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
                if schema is not None
                else {"type": "json_object"}
            )
            bias = close if schema is None else None
            answer = chat(
                tiny_client, stream, response_format=fmt, max_tokens=300, temperature=0, logit_bias=bias
            )
            assert answer["finish_reason"] == "stop" and not answer["tool_calls"], answer
            value = json.loads(answer["content"])
            if schema is None:
                assert isinstance(value, dict)
            else:
                jsonschema.validate(value, schema)

        return run

    jobs = [job(s, stream) for s in SCHEMAS[:12] for stream in (False, True)]
    run_all([*jobs, job(None, False), job(None, True)])


def test_auto_parallel_none_and_single_call(tiny_client: openai.OpenAI) -> None:
    schemas = {"get_weather": SCHEMAS[0], "get_time": SCHEMAS[1]}
    tools = [tool(name, schema) for name, schema in schemas.items()]
    # auto: pushed towards calls and the end by a bias, sampled; whatever is called validates
    auto = tiny_client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=tools,
        tool_choice="auto",
        n=16,
        seed=3,
        temperature=1,
        max_tokens=120,
        logit_bias={"9": 12, "2": 12},
    )
    counts = []
    for choice in auto.choices:
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
        ]
        answer = {
            "content": choice.message.content,
            "tool_calls": calls,
            "finish_reason": choice.finish_reason,
        }
        assert "TOOL_CALLS" not in (choice.message.content or "")
        if choice.finish_reason == "tool_calls":  # others ran out of max_tokens (or called nothing)
            assert_valid_calls(answer, schemas)
            counts.append(len(calls))
    assert counts and max(counts) >= 2, counts  # parallel calls happen

    for stream in (False, True):
        # none: even a model pushed hard towards [TOOL_CALLS] writes plain text
        answer = chat(
            tiny_client, stream, tools=tools, tool_choice="none", max_tokens=12, logit_bias={"9": 100}
        )
        assert not answer["tool_calls"] and "TOOL_CALLS" not in answer["content"], answer
        # parallel_tool_calls=false: one call, then the end, however much the model wants another
        answer = chat(
            tiny_client,
            stream,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=400,
            logit_bias={"9": 100},
        )
        assert_valid_calls(answer, schemas)
        assert len(answer["tool_calls"]) == 1


def test_tool_call_round_trip_encodes_as_mistral_common(
    tiny: ServerProcess, tiny_client: openai.OpenAI, tiny_mistral: Path
) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    tools = [tool("get_weather", schema)]
    first = tiny_client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=tools,
        tool_choice="required",
        max_tokens=60,
        parallel_tool_calls=False,
    )
    call = first.choices[0].message.tool_calls[0]
    reference = MistralTokenizer.from_file(str(tiny_mistral / "tekken.json"))
    for given_id in (call.id, "call_Xy7-openai-style-id"):
        history = [
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call.model_dump(), "id": given_id}],
            },
            {"role": "tool", "tool_call_id": given_id, "content": '{"temperature": 21}'},
        ]
        status, got = post(tiny.url, "/tokenize", {"messages": history, "tools": tools}, AUTH)
        assert status == 200, got
        expected = reference.encode_chat_completion(
            ChatCompletionRequest(
                messages=[
                    UserMessage(content=ASK[0]["content"]),
                    AssistantMessage(
                        tool_calls=[
                            ToolCall(
                                id=call_id(given_id),
                                function=FunctionCall(name="get_weather", arguments=call.function.arguments),
                            )
                        ]
                    ),
                    ToolMessage(tool_call_id=call_id(given_id), content='{"temperature": 21}'),
                ],
                tools=[
                    Tool(
                        function=Function(name="get_weather", description="get_weather it", parameters=schema)
                    )
                ],
            )
        ).tokens
        assert got["tokens"] == expected
        again = tiny_client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=3)
        assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert call_id(call.id) == call.id  # ours are kept; others map to 9 alphanumerics, stably


TOOL = tool("f", {"type": "object", "properties": {"a": {"type": "integer"}}})
BAD: list[tuple[str, dict[str, Any], str]] = [
    # (name, request fields, the field the error must name)
    ("schema not JSON Schema", {"tools": [tool("f", {"type": "objekt"})]}, "tools[0].function.parameters"),
    (
        "schema the grammar engine cannot compile",
        {"tools": [TOOL, tool("g", {"type": "object", "if": {"required": ["a"]}, "then": {}})]},
        "tools[1].function.parameters",
    ),
    ("bad function name", {"tools": [tool("no spaces", {})]}, "tools[0].function.name"),
    ("tool_choice without tools", {"tool_choice": "auto"}, "tool_choice"),
    (
        "named tool_choice not offered",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "tool_choice",
    ),
    (
        "json_schema without schema",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
    ),
    (
        "json_schema without schema inside",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema",
    ),
    (
        "invalid response schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format.json_schema.schema",
    ),
    (
        "json with required tools",
        {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tools",
    ),
    ("unknown response_format", {"response_format": {"type": "yaml"}}, "response_format.type"),
]


@pytest.mark.parametrize(("name", "fields", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_name_the_field(
    tiny: ServerProcess, name: str, fields: dict[str, Any], param: str
) -> None:
    status, reply = post(tiny.url, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **fields}, AUTH)
    assert status == 400, reply
    assert reply["error"]["param"] == param, reply
    if name == "schema the grammar engine cannot compile":
        assert "if" in reply["error"]["message"]


# ---- the demo model (HF tokenizer, no tool-call format) ---------------------------------------------


def test_demo_model_json_output_and_tools_refused(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    answer = client.chat.completions.create(
        model=None, messages=ASK, response_format=fmt, max_tokens=40, temperature=0
    )  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="no tool-call format"):
        client.chat.completions.create(model=None, messages=ASK, tools=[TOOL], max_tokens=2)  # type: ignore[arg-type]
