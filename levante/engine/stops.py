"""Stop strings over streamed text: what a client sees must not depend on how the text was split into
deltas, so text that might still turn into a stop string is held back until it is decided."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Feed each new piece of output text; emit what `feed` returns. The output ends at the stop string
    that completes first (the longest one if several complete at the same character), cut before it
    or, with include_in_output, after it."""

    def __init__(self, stops: Sequence[str], include_in_output: bool) -> None:
        self._stops = tuple(stops)
        self._include = include_in_output
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_open = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""  # the longest tail that is a proper prefix of some stop: at most _max_open chars
        self.matched: str | None = None

    def feed(self, delta: str, final: bool = False) -> tuple[str, str | None]:
        """The text now safe to emit and the stop string that ended the output (None while it goes on).
        `final` says the output ends here, so nothing is held back. Only the held tail and `delta` are
        searched: a stop completing now must start inside the held tail, or it would have been seen."""
        if self.matched is not None:
            return "", self.matched
        text = self._held + delta
        hits = [(i + len(s), -len(s), s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            end, _, stop = min(hits)
            self.matched, self._held = stop, ""
            return text[: end if self._include else end - len(stop)], stop
        keep = len(text) - (0 if final else self._open_tail(text))
        self._held = text[keep:]
        return text[:keep], None

    def _open_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that a later delta could complete into a stop string."""
        for k in range(min(len(text), self._max_open), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
