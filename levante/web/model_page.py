"""The model page's facts: what is loaded, its prices, starter prompts, and measured service status
(P50 latency, throughput and uptime over 30 days, from this server's ledger — or, without one,
from the answers it gave in Spaces — and its own uptime log)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from levante.api.server import Server, State
from levante.web.store import Store

WINDOW_DAYS = 30

STARTERS = [
    {
        "title": "Extract Invoice Line Items",
        "prompt": "Extract all line items from this invoice image into a JSON array. For each item, include "
        "description, quantity, unit_price, and total. Return only valid JSON with no markdown formatting.",
        "needs_image": True,
    },
    {
        "title": "Summarize Support Ticket Thread",
        "prompt": "Read this entire support ticket thread and produce a 3-bullet summary: (1) customer's "
        "core issue, (2) steps already attempted, (3) recommended next action for the support agent.",
        "needs_image": False,
    },
    {
        "title": "Caption Product Photos",
        "prompt": "Write a 2-sentence product image caption for this photo. First sentence describes what's "
        "visible. Second sentence highlights one key feature or benefit. Keep it under 30 words total.",
        "needs_image": True,
    },
    {
        "title": "Classify Customer Feedback",
        "prompt": "Classify this customer message into one category: bug_report, feature_request, "
        "billing_question, or general_inquiry. Also rate sentiment as positive, neutral, or negative. "
        'Return as JSON: {"category": "...", "sentiment": "..."}.',
        "needs_image": False,
    },
    {
        "title": "Translate Technical Docs",
        "prompt": "Translate this technical documentation section from English to Spanish. Preserve all code "
        "snippets exactly as written. Keep the same heading structure and formatting.",
        "needs_image": False,
    },
]
"""The product page's starter prompts, word for word."""


def service_status(timings: list[tuple[float, int]], uptime: float | None) -> dict[str, Any]:
    """P50 of request latency (seconds, end to end) and throughput (completion tokens per second of
    request time) over (latency, completion tokens) pairs."""
    busy = sum(latency for latency, _ in timings)
    return {
        "window_days": WINDOW_DAYS,
        "requests": len(timings),
        "p50_latency": statistics.median(latency for latency, _ in timings) if timings else None,
        "throughput": sum(tokens for _, tokens in timings) / busy if busy > 0 else None,
        "uptime": uptime,
    }


def model_facts(server: Server, state: State, store: Store, tools: bool) -> dict[str, Any]:
    now = time.time()
    since = now - WINDOW_DAYS * 86400
    ledger = server.ledger
    timings = ledger.timings(since) if ledger is not None else store.answer_timings(since)
    prices = server.config.prices
    vision = state.engine.engine.model.config.vision is not None
    return {
        "name": state.model_name,
        "context_length": state.max_model_len,
        "max_output": state.max_model_len - 1,
        "modalities": ["text", "image"] if vision else ["text"],
        "tools": tools,
        "prices": {"input": prices.input, "output": prices.output, "cached_input": prices.cached_input},
        "starters": STARTERS,
        "status": service_status(timings, store.uptime(since, now)),
    }
