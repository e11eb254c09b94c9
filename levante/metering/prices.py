"""What a token costs: per-million-token prices, so a self-hosted bill reads like a hosted one."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from levante.errors import LevanteError

LIST_INPUT, LIST_OUTPUT = 0.10, 0.30
"""Mistral's list price for Mistral Small 3.2, USD per million tokens."""


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; cached-prefix input tokens may be cheaper (None: the input price)."""

    input: float = LIST_INPUT
    output: float = LIST_OUTPUT
    cached_input: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise LevanteError(f"price {name} must be a finite number >= 0, got {value}")

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """USD for one request, as its usage block counts tokens."""
        cached_price = self.input if self.cached_input is None else self.cached_input
        fresh = prompt_tokens - cached_tokens
        return (fresh * self.input + cached_tokens * cached_price + completion_tokens * self.output) / 1e6


def team_cost(
    prices: Prices, seats: int, messages_per_day: int, input_tokens: int, output_tokens: int, days: int
) -> dict[str, float]:
    """A team's tokens over `days` (per seat and message) and what they cost: the math of
    `levante cost` and of the web app's calculator."""
    messages = seats * messages_per_day * days
    tokens_in, tokens_out = messages * input_tokens, messages * output_tokens
    return {
        "messages": messages,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost": prices.cost(tokens_in, 0, tokens_out),
    }


_KEYS = ("input", "output", "cached_input")


def add_price_flags(p: argparse.ArgumentParser) -> None:
    example = '{"input": 0.1, "output": 0.3, "cached_input": 0.05}'
    p.add_argument("--prices", type=Path, help=f"JSON file of prices, e.g. {example}")
    defaults = {"input": str(LIST_INPUT), "output": str(LIST_OUTPUT), "cached_input": "the input price"}
    for key in _KEYS:
        words = key.replace("_", " ")
        help_text = f"USD per million {words} tokens (default {defaults[key]})"
        p.add_argument(f"--price-{key.replace('_', '-')}", type=float, help=help_text)


def prices_from_args(args: argparse.Namespace) -> Prices:
    """The file's prices, then each flag given on top of them."""
    values: dict[str, float] = {}
    if args.prices is not None:
        try:
            raw = json.loads(args.prices.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LevanteError(f"{args.prices}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict) or set(raw) - set(_KEYS):
            raise LevanteError(f"{args.prices}: expected an object with keys {', '.join(_KEYS)}")
        for key, value in raw.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise LevanteError(f"{args.prices}: {key} must be a number, got {value!r}")
        values.update(raw)
    for key in _KEYS:
        flag = getattr(args, f"price_{key}")
        if flag is not None:
            values[key] = flag
    return Prices(**values)
