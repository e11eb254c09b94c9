"""Streaming detokenization for any backend: one token in, the text it completes out.

Tokens are byte pieces (Tekken, byte-level BPE), so one character can span several tokens and a
single token decodes to U+FFFD. Rather than knowing each backend's byte tables, we decode a small
window of ids with the backend's own `decode` and emit only the part that has become stable: text
is held back while it still ends in U+FFFD. The window starts at the previously emitted chunk so
decoders that treat the first token specially (leading-space stripping) cancel out."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids one at a time with `add`; call `flush` at the end. The concatenation of
    everything returned equals `decode(all_ids)`."""

    def __init__(self, decode: Callable[[list[int], bool], str], skip_special: bool = True) -> None:
        self._decode = decode
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (the last emitted chunk, kept as context)
        self._read = 0  # ids before this index are already emitted

    def add(self, token_id: int) -> str:
        """The new stable text after `token_id`, or "" while a character is still incomplete."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (a character the sequence never completed decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self._decode(self._ids[self._prefix : self._read], self._skip_special)
        text = self._decode(self._ids[self._prefix :], self._skip_special)
        if not final and (len(text) <= len(done) or text.endswith(REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]
