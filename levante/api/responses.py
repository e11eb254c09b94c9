"""Engine outputs in OpenAI's response and stream-chunk shapes (chat and legacy completions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from levante.api.tools import ToolCallParser, parse_answer
from levante.engine.engine import Output
from levante.engine.llm import CompletionOutput
from levante.engine.sampler import Sample
from levante.tokenizer import Tokenizer


@dataclass
class Choice(CompletionOutput):
    """One choice's running result, with what the usage block and an echo need besides."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[Sample | None] | None = None

    def add(self, delta: Output) -> None:
        super().add(delta)
        self.prompt_tokens, self.cached_tokens = delta.prompt_tokens, delta.cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (its n choices share it), completions per choice."""
    prompts = choices[::n]
    prompt = sum(c.prompt_tokens for c in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in prompts)},
    }


def _token(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special=False)


def _width(tokenizer: Tokenizer, token: int, text: str) -> int:
    """How far a token moves the text offset: special tokens are not in the returned text."""
    return 0 if tokenizer.is_special(token) else len(text)


def chat_logprobs(tokenizer: Tokenizer, samples: list[Sample]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
            for s in samples
        ]
    }


def completion_logprobs(
    tokenizer: Tokenizer, samples: list[Sample | None], offset: int = 0
) -> dict[str, Any]:
    """Legacy shape: parallel lists; the top dict also holds the chosen token, as vLLM's does. The
    first prompt token of an echo has no logprob (None), like OpenAI's."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for s in samples:
        if s is None:
            continue
        text = _token(tokenizer, s.token)
        tokens.append(text)
        logprobs.append(s.logprob)
        top = {_token(tokenizer, t): lp for t, lp in s.top_logprobs}
        top.setdefault(text, s.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += _width(tokenizer, s.token, text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _echo_logprobs(
    tokenizer: Tokenizer, prompt: list[int], scored: list[Sample | None] | None
) -> dict[str, Any]:
    """The prompt part of an echo: its first token first, with null logprob and top."""
    first = _token(tokenizer, prompt[0])
    rest = completion_logprobs(tokenizer, list(scored or [])[1:], offset=_width(tokenizer, prompt[0], first))
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def _finish(c: Choice | Output) -> dict[str, Any]:
    return {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def _message(c: Choice, tokenizer: Tokenizer, tool_names: frozenset[str] | None) -> dict[str, Any]:
    """The assistant message and finish fields of one choice; with tools offered, calls are parsed
    out of its token ids."""
    if tool_names is None:
        return {"message": {"role": "assistant", "content": c.text}, **_finish(c)}
    content, calls, reason = parse_answer(tokenizer, tool_names, c.token_ids, c.finish_reason)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.as_dict() for call in calls]
    return {"message": message, "finish_reason": reason, "stop_reason": c.stop_reason}


def chat_response(
    head: dict[str, Any], choices: list[Choice], tokenizer: Tokenizer, tool_names: frozenset[str] | None
) -> dict[str, Any]:
    wants_logprobs = any(c.logprobs for c in choices)
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": c.index,
                **_message(c, tokenizer, tool_names),
                "logprobs": chat_logprobs(tokenizer, c.logprobs) if wants_logprobs else None,
            }
            for c in choices
        ],
        "usage": usage(choices, max(1, len(choices))),
    }


def _chat_delta(out: Output, parser: ToolCallParser | None) -> tuple[dict[str, Any], str | None]:
    """One output's delta body and, if it finished, its finish reason."""
    if parser is None:
        return ({"content": out.text} if out.text else {}), out.finish_reason
    delta = parser.feed(out.token_ids, final=out.finished)
    body: dict[str, Any] = {"content": delta.content} if delta.content else {}
    if delta.calls:
        body["tool_calls"] = delta.calls
    return body, parser.finish_reason(out.finish_reason)


async def chat_chunks(
    head: dict[str, Any],
    outputs: AsyncIterator[tuple[int, Output]],
    n: int,
    tokenizer: Tokenizer,
    include_usage: bool,
    tool_names: frozenset[str] | None,
) -> AsyncIterator[dict[str, Any]]:
    """With tools offered, calls are streamed as OpenAI does: a first entry per call with its index,
    id, type and name, then argument fragments; content before them as content deltas."""
    head = {**head, "object": "chat.completion.chunk"}
    choices = [Choice(index=i) for i in range(n)]
    parsers = [ToolCallParser(tokenizer, tool_names) if tool_names is not None else None for _ in range(n)]
    for i in range(n):
        yield {
            **head,
            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
    async for _, out in outputs:
        choices[out.index].add(out)
        body, reason = _chat_delta(out, parsers[out.index])
        if body or out.logprobs:
            logprobs = chat_logprobs(tokenizer, out.logprobs) if out.logprobs else None
            delta = {"index": out.index, "delta": body, "logprobs": logprobs, "finish_reason": None}
            yield {**head, "choices": [delta]}
        if out.finished:
            finish = {"finish_reason": reason, "stop_reason": out.stop_reason}
            yield {**head, "choices": [{"index": out.index, "delta": {}, **finish}]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(choices, n)}


def _completion_text(
    tokenizer: Tokenizer,
    text: str,
    samples: list[Sample],
    wants_logprobs: bool,
    echo: list[int] | None,
    scored: list[Sample | None] | None,
    offset: int = 0,
) -> tuple[str, dict[str, Any] | None]:
    """A choice's text and logprobs (text offsets from `offset`, the length of what the choice
    already returned), with the prompt and its logprobs in front when echoing."""
    if echo is None:
        return text, completion_logprobs(tokenizer, samples, offset) if wants_logprobs else None
    prompt = tokenizer.decode(echo)
    if not wants_logprobs:
        return prompt + text, None
    front = _echo_logprobs(tokenizer, echo, scored)
    back = completion_logprobs(tokenizer, samples, len(prompt))
    return prompt + text, {key: front[key] + back[key] for key in front}


def completion_response(
    head: dict[str, Any],
    choices: list[Choice],
    n: int,
    tokenizer: Tokenizer,
    echo: list[list[int]] | None,
    wants_logprobs: bool,
) -> dict[str, Any]:
    body = []
    for c in choices:
        first = choices[c.index - c.index % n]  # the engine scores the prompt on a request's choice 0
        prompt = echo[c.index // n] if echo is not None else None
        text, logprobs = _completion_text(
            tokenizer, c.text, c.logprobs, wants_logprobs, prompt, first.prompt_logprobs
        )
        body.append({"index": c.index, "text": text, "logprobs": logprobs, **_finish(c)})
    return {**head, "object": "text_completion", "choices": body, "usage": usage(choices, n)}


async def completion_chunks(
    head: dict[str, Any],
    outputs: AsyncIterator[tuple[int, Output]],
    num_prompts: int,
    n: int,
    tokenizer: Tokenizer,
    echo: list[list[int]] | None,
    wants_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """The echo (prompt text and logprobs) rides on each choice's first chunk."""
    head = {**head, "object": "text_completion"}
    choices = [Choice(index=i) for i in range(num_prompts * n)]
    scored: dict[int, list[Sample | None]] = {}
    sent = [-1] * len(choices)  # characters each choice has returned; -1: nothing yet
    async for p, out in outputs:
        index = p * n + out.index
        choices[index].add(out)
        if out.prompt_logprobs is not None:
            scored[p] = out.prompt_logprobs  # choice 0's first output, before its siblings'
        prompt = echo[p] if echo is not None and sent[index] < 0 else None
        text, logprobs = _completion_text(
            tokenizer, out.text, out.logprobs, wants_logprobs, prompt, scored.get(p), max(0, sent[index])
        )
        sent[index] = max(0, sent[index]) + len(text)
        if text or logprobs or out.finished:
            finish = _finish(out) if out.finished else {"finish_reason": None}
            yield {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, **finish}]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(choices, n)}
