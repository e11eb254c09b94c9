"""Function calling and structured output at the API edge: request checks that name the field at
fault, the grammar a request implies, and tool calls parsed back out of the generated token ids.

Policies:
- Arguments always follow the tool's schema, `strict` or not, and a `json_schema` answer always
  follows its schema: the promise is that a call we return parses, names an offered tool and
  validates. Constrained JSON is written compactly (see levante.engine.grammar.COMPACT_JSON).
- Tool-call ids are ours: 9 alphanumerics, unless the model wrote a valid one after `[CALL_ID]`.
  Ids in the history that are not 9 alphanumerics are mapped to such ids by the Mistral tokenizer
  (levante.tokenizer.mistral.call_id), not refused: clients replaying OpenAI conversations work.
- Parsing works on token ids, so control tokens never reach the content. Without grammar
  violations (impossible under the grammar) a finished answer's calls are whole; if anything does
  not parse, the non-streamed answer is returned as plain content instead. A call cut off by
  max_tokens is returned as generated with finish_reason `length`, as OpenAI does, in both modes."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from levante.api.errors import bad_request
from levante.api.protocol import ChatRequest, NamedToolChoice
from levante.engine.grammar import compact, schema_error
from levante.errors import TokenizerError
from levante.tokenizer import Tokenizer

_ID_CHARS = string.ascii_letters + string.digits
_VALID_ID = re.compile(r"[a-zA-Z0-9]{9}")


def new_call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


# ---- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structured:
    """What a chat request asks of the decoder: a grammar (None: free text), and the offered tool
    names when calls are to be parsed out of the answer."""

    grammar: str | None = None
    tool_names: frozenset[str] | None = None


def _check_schema(schema: dict[str, Any], where: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_request(f"{where} is not a valid JSON Schema: {e.message}", where) from None
    error = schema_error(schema)
    if error is not None:
        raise bad_request(f"{where}: the grammar engine cannot compile this schema: {error}", where)


def structured(req: ChatRequest, tokenizer: Tokenizer) -> Structured:
    """The request's tools, tool_choice and response_format checked and turned into a grammar.
    Raises a 400 naming the field for anything that cannot be honoured."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools:
        raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", "tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(
            f"tool_choice names function {choice.function.name!r}, which is not among the tools {names}",
            "tool_choice",
        )
    specs = []
    for i, tool in enumerate(tools):
        spec = tool.model_dump(exclude_none=True)
        parameters = tool.function.parameters
        if parameters is not None:
            _check_schema(parameters, f"tools[{i}].function.parameters")
            spec["function"]["parameters"] = compact(parameters)
        specs.append(spec)
    schema = None
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema", "response_format.json_schema"
            )
        schema = fmt.json_schema.json_schema
        _check_schema(schema, "response_format.json_schema.schema")
    elif fmt is not None and fmt.type == "json_object":
        schema = {"type": "object"}
    tool_choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    try:
        grammar = tokenizer.grammar(
            specs or None,
            tool_choice,
            req.parallel_tool_calls is not False,
            compact(schema) if schema is not None else None,
        )
    except TokenizerError as e:
        raise bad_request(str(e), "tools" if tools else "response_format") from None
    return Structured(grammar, frozenset(names) if tools and choice != "none" else None)


# ---- answers ------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class Delta:
    """What one batch of ids added: content text, and OpenAI `tool_calls` delta entries."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def add_arguments(self, index: int, text: str) -> None:
        if not text:
            return
        last = self.calls[-1] if self.calls else None
        if last is not None and last["index"] == index:
            last["function"]["arguments"] += text
        else:
            self.calls.append({"index": index, "function": {"arguments": text}})


class ToolCallParser:
    """One choice's generated ids, split as they arrive into content and tool calls in the
    tokenizer's format (see ToolCallTokens): content until the first `[TOOL_CALLS]`, then per call
    a head (name, optional `[CALL_ID]` id) up to `[ARGS]` and arguments up to the next call or the
    end. A head that never reaches `[ARGS]` is the pre-v11 JSON list, parsed at the end."""

    def __init__(self, tokenizer: Tokenizer, names: frozenset[str]) -> None:
        if tokenizer.tool_call_tokens is None:
            raise ValueError("this tokenizer has no tool-call format")
        self._tokens = tokenizer.tool_call_tokens
        self._tokenizer = tokenizer
        self.names = names
        self._text = tokenizer.detokenizer()  # content, then the current call's arguments
        self._head: list[int] | None = None  # ids since the last [TOOL_CALLS] while before [ARGS]
        self.content = ""
        self.calls: list[ToolCall] = []
        self.malformed = False  # a call head that was neither v11 nor a pre-v11 list
        self._blank = ""  # whitespace at the end of the arguments so far, held until more follows

    def feed(self, ids: list[int], final: bool = False) -> Delta:
        """What `ids` add; `final` when they are the answer's last, so nothing is held back."""
        delta = Delta()
        for token in ids:
            if token == self._tokens.calls:
                self._flush(delta)
                self._head = []
            elif self._head is None:
                self._add_text(delta, self._text.add(token))
            elif token == self._tokens.args:
                self._start_call(delta, self._head)
                self._head = None
            else:
                self._head.append(token)
        if final:
            self._flush(delta)
        return delta

    def _add_text(self, delta: Delta, text: str) -> None:
        """Arguments lose the whitespace the grammar lets the model put around the JSON (held back
        at the end until more text shows it was inside), so they read like json.dumps output."""
        if self.calls:
            call = self.calls[-1]
            text = self._blank + text if call.arguments else text.lstrip()
            body = text.rstrip()
            self._blank = text[len(body) :]
            call.arguments += body
            delta.add_arguments(len(self.calls) - 1, body)
        else:
            self.content += text
            delta.content += text

    def _flush(self, delta: Delta) -> None:
        self._add_text(delta, self._text.flush())
        self._text, self._blank = self._tokenizer.detokenizer(), ""
        if self._head is not None:  # a call without [ARGS]: the pre-v11 list, or something broken
            self._legacy(delta, self._tokenizer.decode(self._head))
            self._head = None

    def _start_call(self, delta: Delta, head: list[int]) -> None:
        name_ids, given_id = head, ""
        if self._tokens.call_id is not None and self._tokens.call_id in head:
            k = head.index(self._tokens.call_id)
            name_ids, given_id = head[:k], self._tokenizer.decode(head[k + 1 :]).strip()
        call_id = given_id if _VALID_ID.fullmatch(given_id) else new_call_id()
        self._open(delta, ToolCall(call_id, self._tokenizer.decode(name_ids).strip()))

    def _open(self, delta: Delta, call: ToolCall) -> None:
        self.calls.append(call)
        delta.calls.append({"index": len(self.calls) - 1, **call.as_dict()})

    def _legacy(self, delta: Delta, text: str) -> None:
        try:
            items = json.loads(text)
            calls = [(item["name"], item.get("arguments", {})) for item in items]
        except (json.JSONDecodeError, TypeError, KeyError):
            self.malformed = True
            self.content += text  # streamed, it arrives after any calls: all the client can be given
            delta.content += text
            return
        for name, arguments in calls:
            args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            self._open(delta, ToolCall(new_call_id(), str(name)))
            self._add_text(delta, args)

    def valid(self, finish_reason: str | None) -> bool:
        """Every call names an offered tool and, unless the answer was cut short, has a JSON
        object for arguments."""
        if self.malformed or any(c.name not in self.names for c in self.calls):
            return False
        return finish_reason == "length" or all(_is_object(c.arguments) for c in self.calls)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def parse_answer(
    tokenizer: Tokenizer, names: frozenset[str], ids: list[int], engine_reason: str | None
) -> tuple[str | None, list[ToolCall], str | None]:
    """A whole answer's (content, calls, finish_reason); an answer whose calls do not hold up is
    returned as plain content, never as an error."""
    parser = ToolCallParser(tokenizer, names)
    parser.feed(ids, final=True)
    if not parser.valid(engine_reason):
        return tokenizer.decode(ids), [], engine_reason
    return parser.content or (None if parser.calls else ""), parser.calls, parser.finish_reason(engine_reason)
