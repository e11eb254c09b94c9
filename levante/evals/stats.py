"""How sure a score is, and whether two runs differ: intervals over the items a score was measured on.

A metric that is the mean of one number per item (accuracy, pass@k, ANLS, a loop rate) gets a
closed form: the Wilson interval when every item scored 0 or 1, else the normal interval of the
mean. Any other metric (IFEval's instruction-level accuracy, BFCL's mean over categories,
SimpleQA's F-score) gets a percentile bootstrap over items, recomputed by the suite's own
summary. Two runs are compared on the items both scored: the paired bootstrap of the difference
(items resampled together, so an item's difficulty cancels) and, where every item passed or
failed, McNemar's exact test on the items that flipped. Fixed seeds: the same runs always give
the same intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the normal distribution's 97.5th percentile
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A score (percent) with its standard error and 95% interval, and how they were computed."""

    value: float
    se: float
    low: float
    high: float
    n: int
    method: str  # "wilson", "normal" or "bootstrap"


@dataclass(frozen=True)
class Difference:
    """B − A on the shared items (percentage points) with its paired 95% interval; for pass/fail
    metrics McNemar's exact p-value and the counts of items that flipped each way."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    n: int
    method: str  # "paired bootstrap of the mean" or "paired bootstrap of the suite's summary"
    p_mcnemar: float | None = None
    a_only: int | None = None  # items A passed and B failed
    b_only: int | None = None

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        return self.low > 0 or self.high < 0


def wilson(passed: float, n: int) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion, in percent."""
    p = passed / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar test: the binomial probability, under no difference, of a split of
    the discordant items at least as uneven as this one."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """`resamples` rows of n item indices drawn with replacement: numpy's PCG64 from `seed`."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def mean_interval(values: Sequence[float]) -> Interval:
    """The interval of a mean of per-item values in [0, 1], reported in percent."""
    n = len(values)
    mean = sum(values) / n
    if binary(values):
        low, high = wilson(sum(values), n)
        return Interval(100 * mean, 100 * math.sqrt(mean * (1 - mean) / n), low, high, n, "wilson")
    sd = float(np.std(values, ddof=1)) if n > 1 else 0.0
    se = 100 * sd / math.sqrt(n)
    value = 100 * mean
    return Interval(value, se, max(0.0, value - Z95 * se), min(100.0, value + Z95 * se), n, "normal")


def _spread(draws: np.ndarray) -> tuple[float, float, float]:
    """(2.5th percentile, 97.5th, standard deviation) of the defined draws; NaN when none is."""
    draws = draws[~np.isnan(draws)]
    if len(draws) < 2:
        return math.nan, math.nan, math.nan
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high), float(np.std(draws, ddof=1))


def percentile_interval(value: float, draws: np.ndarray, n: int) -> Interval:
    """A score's bootstrap interval from its values on the resamples (NaN: undefined there)."""
    low, high, sd = _spread(draws)
    return Interval(value, sd, low, high, n, "bootstrap")


def paired_mean_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """B − A for a metric that is the mean of per-item values, on the same items in the same order."""
    n = len(a)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    draws = 100 * (y - x)[resample_indices(n)].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    out = {"a": 100 * x.mean(), "b": 100 * y.mean(), "diff": 100 * (y - x).mean(), "n": n}
    out |= {"low": float(low), "high": float(high), "method": "paired bootstrap of the mean"}
    if binary(a) and binary(b):
        a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        out |= {"p_mcnemar": mcnemar_exact(a_only, b_only), "a_only": a_only, "b_only": b_only}
    return Difference(**out)


def paired_difference(a: float, b: float, draws: np.ndarray, n: int) -> Difference:
    """B − A for any metric, from B's minus A's value on each paired resample of the shared items
    (NaN where a resample leaves the metric undefined, e.g. a category drawn empty)."""
    low, high, _ = _spread(draws)
    return Difference(a, b, b - a, low, high, n, "paired bootstrap of the suite's summary")
