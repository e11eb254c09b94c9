"""Prometheus metrics under vLLM's names with our `levante:` prefix, so existing dashboards and
benchmark tools apply, and the per-request log line.

Engine-side counts (tokens, prefix cache, finishes, queue lengths, KV usage) are read from the
engine at scrape time; latencies are observed here, per request, as the client sees them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from levante.engine.async_engine import AsyncEngine
from levante.engine.engine import Output

log = logging.getLogger("levante.requests")

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_TOKEN_GAP = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class _EngineCollector:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        e = self.engine.engine
        stats, blocks = e.stats, e.blocks
        used = blocks.num_blocks - sum(1 for r in blocks.ref if r == 0)
        gauges = {
            "num_requests_running": ("Sequences in the running batch.", len(e.scheduler.running)),
            "num_requests_waiting": ("Sequences waiting for a place in the batch.", self.engine.num_queued),
            "kv_cache_usage_perc": (
                "Fraction of KV-cache blocks in use (1 = full).",
                used / blocks.num_blocks,
            ),
            "batch_invariant": (
                "1 if a request's logits are the same bits whatever else is in the batch.",
                int(e.batch_invariant),
            ),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"levante:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        counters = {
            "prompt_tokens": ("Prompt tokens prefilled (cache hits excluded).", stats.prompt_tokens),
            "generation_tokens": ("Tokens generated.", stats.generation_tokens),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", blocks.prefix_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", blocks.prefix_hits),
            "num_preemptions": ("Sequences preempted for lack of KV blocks.", stats.preemptions),
            "spec_decode_num_drafts": (
                "Steps in which a sequence's proposals were checked.",
                stats.spec_drafts,
            ),
            "spec_decode_num_draft_tokens": ("Proposed tokens checked.", stats.spec_draft_tokens),
            "spec_decode_num_accepted_tokens": ("Proposed tokens kept.", stats.spec_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(f"levante:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c
        finished = CounterMetricFamily(
            "levante:request_success",
            "Finished sequences by reason.",
            labels=["model_name", "finished_reason"],
        )
        for reason, count in sorted(stats.finished.items()):
            finished.add_metric([self.model_name, reason], count)
        yield finished


class Metrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(f"levante:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry)
            return h.labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", _TOKEN_GAP)
        self.tpot = histogram(
            "request_time_per_output_token_seconds", "Mean time per output token after the first.", _TOKEN_GAP
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY)
        self.queue = histogram("request_queue_time_seconds", "Time waiting before first scheduled.", _LATENCY)
        self.mcp_up = Gauge(
            "levante:mcp_server_up", "1 while an MCP server is connected.", ["server"], registry=self.registry
        )
        self.mcp_tools = Gauge(
            "levante:mcp_server_tools", "Tools an MCP server lists.", ["server"], registry=self.registry
        )
        self.mcp_restarts = Gauge(
            "levante:mcp_server_restarts",
            "Times an MCP server was restarted.",
            ["server"],
            registry=self.registry,
        )

    def observe_mcp(self, status: dict[str, dict[str, Any]]) -> None:
        """The MCP servers' state as of this scrape."""
        for name, s in status.items():
            self.mcp_up.labels(name).set(1 if s["state"] == "ready" else 0)
            self.mcp_tools.labels(name).set(s["tools"])
            self.mcp_restarts.labels(name).set(s["restarts"])


class RequestTracker:
    """One request's timeline: feeds the histograms and writes the request log line at the end."""

    def __init__(self, metrics: Metrics, request_id: str, prompt_text: str | None = None) -> None:
        self.metrics, self.request_id, self.prompt_text = metrics, request_id, prompt_text
        self.start = time.monotonic()
        self.first: float | None = None
        self.last = self.start
        self.tokens = 0
        self.prompt_tokens = self.cached_tokens = 0
        self.queue_time: float | None = None
        self.reasons: list[str] = []
        self.drafted: dict[int, tuple[int, int]] = {}  # choice → (tokens proposed, kept) so far
        self.error = False  # the request failed in the engine (set by whoever consumes its outputs)

    def observe(self, out: Output) -> None:
        now = time.monotonic()
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        if self.queue_time is None and out.scheduled_at is not None:
            self.queue_time = max(0.0, out.scheduled_at - out.arrival)
        if out.token_ids:
            if self.first is None:
                self.first = now
                self.metrics.ttft.observe(now - self.start)
            else:
                gap = (now - self.last) / len(out.token_ids)
                for _ in out.token_ids:
                    self.metrics.itl.observe(gap)
            self.last = now
            self.tokens += len(out.token_ids)
        if out.spec_proposed:
            self.drafted[out.index] = (out.spec_proposed, out.spec_accepted)
        if out.finished:
            self.reasons.append(out.finish_reason or "abort")

    def finish(self) -> None:
        now = time.monotonic()
        total = now - self.start
        m = self.metrics
        m.e2e.observe(total)
        if self.queue_time is not None:
            m.queue.observe(self.queue_time)
        if self.first is not None and self.tokens > 1:
            m.tpot.observe((now - self.first) / (self.tokens - 1))
        ttft = f"{self.first - self.start:.3f}s" if self.first is not None else "-"
        proposed, kept = (
            (sum(x) for x in zip(*self.drafted.values(), strict=True)) if self.drafted else (0, 0)
        )
        spec = f" spec_accepted={kept}/{proposed}" if proposed else ""
        log.info(
            "%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s%s%s",
            self.request_id,
            self.prompt_tokens,
            self.cached_tokens,
            self.tokens,
            ttft,
            total,
            ",".join(self.reasons) or "abort",
            spec,
            f" prompt={self.prompt_text!r}" if self.prompt_text is not None else "",
        )
