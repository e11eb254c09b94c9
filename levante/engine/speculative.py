"""Prompt-lookup (n-gram) speculation: guesses of the next tokens, checked by the model in one step.

An answer that copies from its prompt — line items into JSON, a function returned whole, code kept
exactly in a translation — repeats runs of tokens the sequence already holds. Where the last n
tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`, longest first) occurred before,
the tokens that followed that most recent occurrence are proposed; the engine feeds them with the
sequence's last token in one forward (reading the weights once, as for one token), keeps the
proposals the model itself would have chosen and the model's own token after the last of them.
Under greedy decoding the answer is the one decoding without speculation gives, token for token:
each kept token is the argmax of the same logits (in batch-invariant mode every row is computed
alone, so a row's logits do not depend on the rows fed beside it). Sampled, a proposal is kept
with its probability under the request's distribution, else a token is drawn from the rest of it
(`sampler.check`): the answers' distribution is the model's."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `--speculative-config` fields for the n-gram method."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most tokens proposed a step
    prompt_lookup_max: int = 4  # the longest suffix looked up
    prompt_lookup_min: int = 2  # the shortest
    disable_by_batch_size: int = 8  # no speculation in steps with more running sequences than this

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From JSON text or a dict, each bad field named (ValueError)."""
        try:
            body = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative config: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ValueError("speculative config: expected a JSON object")
        if body.get("method", "ngram") not in METHODS:
            raise ValueError(f"speculative config: method {body['method']!r} is not supported; use ngram")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(
                f"speculative config: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        for name in known - {"method"}:
            if name in body and (
                not isinstance(body[name], int) or isinstance(body[name], bool) or body[name] < 1
            ):
                raise ValueError(f"speculative config: {name} must be a positive integer, not {body[name]!r}")
        config = cls(**body)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative config: prompt_lookup_min must not exceed prompt_lookup_max")
        return config


class NgramIndex:
    """Where each n-gram (n in [low, high]) of one sequence last ended, kept up to date as the
    sequence grows, so a lookup costs a dictionary probe instead of a scan of the context."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions <= this are in `ends`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
        of `tokens` seen before; [] when there is none."""
        last = len(tokens) - 1  # the suffix itself ends at len(tokens): index every end before it
        for end in range(self.indexed + 1, last + 1):
            for n in range(self.low, min(self.high, end) + 1):
                self.ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, last)
        for n in range(min(self.high, len(tokens)), self.low - 1, -1):
            end = self.ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + k]
        return []
