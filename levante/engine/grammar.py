"""Grammar-constrained decoding: each constrained sequence carries an llguidance matcher; every step
the matcher's allowed-token set masks the sequence's logits, and the sampled token advances it.

Why llguidance: mistral-common's `GrammarFactory`, the reference for Mistral's tool-call format
(`[TOOL_CALLS]name[ARGS]{json}`, where the EOS may go, tool_choice and parallel_tool_calls), emits
llguidance Lark, so the format is not restated here and cannot drift from the tokenizer's; with
xgrammar we would have to write and maintain that grammar ourselves. Measured on this 2-core CPU:
the llguidance tokenizer takes 0.5 s to build for Tekken's 131K tokens (0.3 s for the demo's 49K,
once per server), a grammar compiles in ~1-2 ms (lexing lazily), and a mask costs 0.01-0.15 ms
per token for tool-call and JSON-schema grammars; end to end see benchmarks/grammar.py. Its JSON
Schema support covers what tools use (anyOf, enums, bounds, lengths, nesting); what it lacks
(`if`/`then`, look-around patterns) is reported by keyword. xgrammar was not measured here.

Grammars are compiled once per distinct text and kept in an LRU cache; each sequence gets a cheap
deep copy of the compiled matcher."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance as llg
import numpy as np
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

# JSON inside a constrained answer is written as json.dumps writes it (what Mistral's tool calls
# look like in training) with no free whitespace: a model cannot wander into endless blank space.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile; the message says what it rejects."""


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's layout options attached (they are read from the top level)."""
    return {**schema, "x-guidance": COMPACT_JSON}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar accepting exactly the JSON documents valid under `schema`, compactly written."""
    return llg.LLMatcher.grammar_from_json_schema(compact(schema))


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why llguidance cannot compile `schema` (e.g. 'Unimplemented keys: ["if"]'), or None."""
    try:
        message = llg.LLMatcher.validate_grammar(json_schema_grammar(schema))
    except ValueError as e:
        return str(e)
    return message or None


class Grammars:
    """Compiled matchers for one tokenizer, by grammar text (llguidance Lark or JSON grammar).

    `tokenizer` builds the llguidance tokenizer on first use, so servers that never see a
    constrained request never pay for it."""

    def __init__(
        self, tokenizer: Callable[[], llg.LLTokenizer], vocab_size: int, cache_size: int = 256
    ) -> None:
        self._make_tokenizer = tokenizer
        self._tokenizer: llg.LLTokenizer | None = None
        self._vocab_size = vocab_size
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._executor: llg.LLExecutor | None = None
        self._lock = threading.Lock()  # the server compiles on request threads, the engine on its own

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def matcher(self, grammar: str) -> llg.LLMatcher:
        """A fresh matcher at the grammar's start. Raises GrammarError if it does not compile."""
        with self._lock:
            compiled = self._cache.get(grammar)
            if compiled is None:
                compiled = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
                if compiled.is_error():
                    raise GrammarError(compiled.get_error())
                self._cache[grammar] = compiled
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(grammar)
            return compiled.deep_copy()

    def allowed(self, matchers: list[llg.LLMatcher]) -> torch.Tensor:
        """bool [len(matchers), vocab_size]: the tokens each matcher accepts next, computed in
        parallel. Ids past the grammar tokenizer's vocabulary (padding rows of the embedding) are
        never allowed."""
        if self._executor is None:
            self._executor = llg.LLExecutor()
        n_vocab = self.tokenizer.vocab_size
        bitmask = allocate_token_bitmask(len(matchers), n_vocab)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits[:, : min(n_vocab, self._vocab_size)].view(np.bool_))
        if n_vocab < self._vocab_size:
            allowed = torch.nn.functional.pad(allowed, (0, self._vocab_size - n_vocab))
        return allowed
