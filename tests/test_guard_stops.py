"""The loop guard and stop strings against brute-force oracles, by hand and by hypothesis."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import overload

from hypothesis import given
from hypothesis import strategies as st

from levante.engine.guard import repeating_tail
from levante.engine.sampling_params import RepetitionDetection
from levante.engine.stops import StopStrings

# ---- loop guard ----------------------------------------------------------------------------


def oracle_repeating(tokens: Sequence[int], cfg: RepetitionDetection) -> bool:
    tokens = list(tokens)
    for size in range(cfg.min_pattern_size, cfg.max_pattern_size + 1):
        tail = tokens[len(tokens) - size * cfg.min_count :]
        if len(tail) == size * cfg.min_count and tail == tail[-size:] * cfg.min_count:
            return True
    return False


def guard(max_pattern_size: int, min_pattern_size: int = 1, min_count: int = 3) -> RepetitionDetection:
    return RepetitionDetection(max_pattern_size, min_pattern_size, min_count)


def test_guard_hand_cases() -> None:
    seven = [11, 12, 13, 14, 15, 16, 17]
    cases = [
        ([5, 5, 5], guard(3), True),  # period 1
        ([9, 5, 5], guard(3), False),  # below min_count
        ([1, 2, 1, 2, 1, 2], guard(3), True),  # period 2
        ([2, 1, 2, 1, 2], guard(3), False),  # 2.5 copies
        ([1, 2, 1, 2, 1, 2, 9], guard(3), False),  # the loop must be the tail
        ([0, *seven * 2], guard(7, min_count=2), True),  # period 7
        ([0, *seven * 2], guard(6, min_count=2), False),  # pattern longer than max_pattern_size
        ([0, *seven * 2], guard(8, min_pattern_size=8, min_count=2), False),
        ([5] * 6, guard(4, min_pattern_size=2), True),  # (5, 5) three times
        ([5] * 5, guard(4, min_pattern_size=2), False),
        ([5] * 100, guard(0), False),  # off
        ([], guard(3), False),
    ]
    for tokens, cfg, expected in cases:
        assert repeating_tail(tokens, cfg) is expected, (tokens, cfg)


class Periodic(Sequence[int]):
    """A trillion tokens cycling through `pattern`: only a guard that reads the tail can answer."""

    def __init__(self, pattern: list[int]) -> None:
        self.pattern = pattern

    def __len__(self) -> int:
        return 10**12

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> list[int]: ...
    def __getitem__(self, key: int | slice) -> int | list[int]:
        if isinstance(key, slice):
            return [self.pattern[i % len(self.pattern)] for i in range(len(self))[key]]
        return self.pattern[range(len(self))[key] % len(self.pattern)]


def test_guard_reads_only_the_tail() -> None:
    assert repeating_tail(Periodic([1, 2, 3]), guard(20))
    assert not repeating_tail(Periodic(list(range(30))), guard(20))


configs = st.integers(1, 8).flatmap(
    lambda top: st.builds(guard, st.just(top), st.integers(1, top), st.integers(2, 5))
) | st.builds(guard, st.just(0))


@given(
    prefix=st.lists(st.integers(0, 2), max_size=12),
    pattern=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    repeats=st.integers(0, 5),
    suffix=st.lists(st.integers(0, 2), max_size=3),
    cfg=configs,
)
def test_guard_matches_brute_force(
    prefix: list[int], pattern: list[int], repeats: int, suffix: list[int], cfg: RepetitionDetection
) -> None:
    tokens = prefix + pattern * repeats + suffix
    assert repeating_tail(tokens, cfg) == oracle_repeating(tokens, cfg)


# ---- stop strings --------------------------------------------------------------------------


def oracle_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Non-streaming: cut at the stop that completes first; of those, the longest."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def stream(text: str, cuts: Sequence[int], stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Feeds `text` split at `cuts`, checking after every delta that nothing past the
    non-streamed result was emitted and that no more than a stop's length is held back."""
    expected, _ = oracle_stop(text, stops, include)
    bounds = [0, *sorted(cuts), len(text)]
    s, emitted, stopped = StopStrings(stops, include), "", None
    for i, (a, b) in enumerate(pairwise(bounds)):
        out, stopped = s.feed(text[a:b], final=i == len(bounds) - 2)
        emitted += out
        assert expected.startswith(emitted)
        if stopped is not None:
            break
        assert b - len(emitted) <= max((len(x) for x in stops), default=1) - 1
    return emitted, stopped


@given(
    text=st.text("abc", max_size=40),
    stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    data=st.data(),
)
def test_streaming_equals_non_streaming_for_any_split(
    text: str, stops: list[str], include: bool, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert stream(text, cuts, stops, include) == oracle_stop(text, stops, include)


def test_stop_include_in_output_both_ways() -> None:
    assert stream("Hello END world", [3, 8, 11], ["END"], False) == ("Hello ", "END")
    assert stream("Hello END world", [3, 8, 11], ["END"], True) == ("Hello END", "END")


def test_stop_split_across_deltas_is_caught_and_held_back() -> None:
    s = StopStrings(["</answer>"], False)
    assert s.feed("42</ans") == ("42", None)
    assert s.feed("wer> more") == ("", "</answer>")
    assert s.feed("after") == ("", "</answer>")


def test_false_start_is_released() -> None:
    s = StopStrings(["STOP"], False)
    assert s.feed("a ST") == ("a ", None)
    assert s.feed("ORE") == ("STORE", None)
    assert s.feed("ST", final=True) == ("ST", None)


def test_overlapping_stops() -> None:
    # "bcd" completes before "abcde" could; at the same end, the longer one wins
    assert stream("xabcdef", [2, 4], ["abcde", "bcd"], False) == ("xa", "bcd")
    assert stream("xabcd", [3], ["bcd", "abcd"], False) == ("x", "abcd")
    assert stream("xabcd", [3], ["bcd", "abcd"], True) == ("xabcd", "abcd")
    assert stream("aaab", [1, 2, 3], ["aab"], False) == ("a", "aab")


def test_stop_at_the_very_start() -> None:
    assert stream("STOP then text", [1, 2], ["STOP"], False) == ("", "STOP")
    assert stream("STOP then text", [], ["STOP"], True) == ("STOP", "STOP")


def test_no_stops_emits_everything_at_once() -> None:
    assert StopStrings([], False).feed("anything") == ("anything", None)
