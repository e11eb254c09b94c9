"""A suite's scores with their intervals, and two runs' differences, from the records themselves:
a metric that is the mean of a per-item score gets the closed forms of `stats`; any other is
recomputed by the suite's own `summarize` on bootstrap resamples of the items."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from levante.evals.stats import (
    Difference,
    Interval,
    mean_interval,
    paired_difference,
    paired_mean_difference,
    percentile_interval,
    resample_indices,
)
from levante.evals.suite import Options, Record, suite_class

Summary = Callable[[list[Record]], dict[str, float]]


def summary_of(suite: str) -> Summary:
    """The suite's own summary (it reads only the records, never the options)."""
    return suite_class(suite)(Options()).summarize


def per_item(records: list[Record], metric: str, value: float) -> list[float] | None:
    """The per-item scores whose mean (in percent) is `value`, or None when the metric is not such
    a mean (a ratio of sums, a mean over categories)."""
    values = [r.scores[metric] for r in records if metric in r.scores]
    if values and abs(100 * sum(values) / len(values) - value) <= 1e-9 * max(1.0, abs(value)):
        return values
    return None


def _draws(metric: str, rows: list[dict[str, float]]) -> np.ndarray:
    return np.array([row.get(metric, np.nan) for row in rows], dtype=float)


def _resampled(summarize: Summary, records: list[Record]) -> list[dict[str, float]]:
    """The summary of every bootstrap resample of the records; the resamples depend only on the
    number of records, so two runs' lists of the same items are resampled in pairs."""
    return [summarize([records[i] for i in row]) for row in resample_indices(len(records))]


def intervals(summarize: Summary, records: list[Record], metrics: dict[str, float]) -> dict[str, Interval]:
    """Each metric's 95% interval over the records it was measured on."""
    out: dict[str, Interval] = {}
    rows: list[dict[str, float]] | None = None
    for metric, value in metrics.items():
        values = per_item(records, metric, value)
        if values is not None:
            out[metric] = mean_interval(values)
            continue
        rows = rows if rows is not None else _resampled(summarize, records)
        out[metric] = percentile_interval(value, _draws(metric, rows), len(records))
    return out


def differences(summarize: Summary, a: list[Record], b: list[Record]) -> dict[str, Difference]:
    """B − A for every metric both runs have, on records of the same items in the same order."""
    summary_a, summary_b = summarize(a), summarize(b)
    out: dict[str, Difference] = {}
    rows: tuple[list[dict[str, float]], list[dict[str, float]]] | None = None
    for metric in [m for m in summary_a if m in summary_b]:
        if (
            per_item(a, metric, summary_a[metric]) is not None
            and per_item(b, metric, summary_b[metric]) is not None
        ):
            both = [(x, y) for x, y in zip(a, b, strict=True) if metric in x.scores and metric in y.scores]
            if not both:
                continue  # no shared item measured it on both sides
            out[metric] = paired_mean_difference(
                [x.scores[metric] for x, _ in both], [y.scores[metric] for _, y in both]
            )
            continue
        rows = rows if rows is not None else (_resampled(summarize, a), _resampled(summarize, b))
        draws = _draws(metric, rows[1]) - _draws(metric, rows[0])
        out[metric] = paired_difference(summary_a[metric], summary_b[metric], draws, len(a))
    return out
