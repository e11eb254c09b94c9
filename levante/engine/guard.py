"""Loop guard: notice when generation has fallen into an exact cycle, so the engine can stop it with
finish_reason "repetition" instead of burning tokens up to max_tokens (vLLM `repetition_detection`)."""

from __future__ import annotations

from collections.abc import Sequence

from levante.engine.sampling_params import RepetitionDetection


def repeating_tail(tokens: Sequence[int], cfg: RepetitionDetection) -> bool:
    """True when `tokens` ends with one pattern of L tokens (min_pattern_size <= L <= max_pattern_size)
    repeated at least min_count times in a row.

    Runs once per generated token, so it reads only the last max_pattern_size * min_count tokens and does
    O(that) work: with the tail reversed into `s`, the tail has period L for exactly z[L] tokens beyond
    the first L, where z is the Z-function of `s` (longest common prefix of s and s[L:]). The Z-function
    is needed only up to max_pattern_size, and its matching pointer never moves back."""
    if not cfg.enabled:
        return False
    s = list(tokens[-cfg.max_pattern_size * cfg.min_count :])[::-1]
    n = len(s)
    z = [0] * (cfg.max_pattern_size + 1)
    left = right = 0  # s[left:right] == s[: right - left], with right as far as found so far
    for period in range(1, min(cfg.max_pattern_size, n // cfg.min_count) + 1):
        length = min(right - period, z[period - left]) if period < right else 0
        while period + length < n and s[length] == s[period + length]:
            length += 1
        if period + length > right:
            left, right = period, period + length
        z[period] = length
        if period >= cfg.min_pattern_size and length >= period * (cfg.min_count - 1):
            return True
    return False
