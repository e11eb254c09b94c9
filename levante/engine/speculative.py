"""Speculation: guesses of the next tokens, checked by the model in one step — by prompt lookup
(n-grams) or by a small draft model with the same tokenizer.

An answer that copies from its prompt — line items into JSON, a function returned whole, code kept
exactly in a translation — repeats runs of tokens the sequence already holds. Where the last n
tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`, longest first) occurred before,
the tokens that followed that most recent occurrence are proposed; the engine feeds them with the
sequence's last token in one forward (reading the weights once, as for one token), keeps the
proposals the model itself would have chosen and the model's own token after the last of them.
Under greedy decoding the answer is the one decoding without speculation gives, token for token:
each kept token is the argmax of the same logits (in batch-invariant mode every row is computed
alone, so a row's logits do not depend on the rows fed beside it). Sampled, a proposal is kept
with its probability under the request's distribution, else a token is drawn from the rest of it
(`sampler.check`): the answers' distribution is the model's. A draft model proposes greedily (its
argmax, one guess per position), so the same rule keeps the distribution with it too; it keeps its
own small paged KV cache, rolled back to what the target kept after every step."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from levante.engine.kv_cache import BlockManager, KVStore
from levante.engine.runner import Runner
from levante.engine.sequence import Sequence

if TYPE_CHECKING:
    from levante.model import Model

METHODS = ("ngram", "draft_model")
DRAFT_CACHE_GIB = 1.0  # the most a draft model's KV cache takes


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `--speculative-config` fields for the n-gram method."""

    method: str = "ngram"
    model: str | None = None  # draft_model: the draft checkpoint (the same tokenizer as the target)
    num_speculative_tokens: int = 4  # the most tokens proposed a step
    prompt_lookup_max: int = 4  # the longest suffix looked up
    prompt_lookup_min: int = 2  # the shortest
    disable_by_batch_size: int = 8  # no speculation in steps with more running sequences than this

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From JSON text or a dict, each bad field named (ValueError)."""
        try:
            body = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative config: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ValueError("speculative config: expected a JSON object")
        if body.get("method", "ngram") not in METHODS:  # first: another method has fields of its own
            raise ValueError(
                f"speculative config: method {body['method']!r} is not supported; use ngram or draft_model"
            )
        if (body.get("method") == "draft_model") != isinstance(body.get("model"), str):
            raise ValueError(
                "speculative config: model (a path) goes with method draft_model, and only with it"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(
                f"speculative config: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        for name in known - {"method", "model"}:
            if name in body and (
                not isinstance(body[name], int) or isinstance(body[name], bool) or body[name] < 1
            ):
                raise ValueError(f"speculative config: {name} must be a positive integer, not {body[name]!r}")
        config = cls(**body)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative config: prompt_lookup_min must not exceed prompt_lookup_max")
        return config


class NgramIndex:
    """Where each n-gram (n in [low, high]) of one sequence last ended, kept up to date as the
    sequence grows, so a lookup costs a dictionary probe instead of a scan of the context."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions <= this are in `ends`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
        of `tokens` seen before; [] when there is none."""
        last = len(tokens) - 1  # the suffix itself ends at len(tokens): index every end before it
        for end in range(self.indexed + 1, last + 1):
            for n in range(self.low, min(self.high, end) + 1):
                self.ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, last)
        for n in range(min(self.high, len(tokens)), self.low - 1, -1):
            end = self.ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + k]
        return []


class DraftModel:
    """A small model with the target's tokenizer that proposes greedily: each step it is fed what
    it has not seen of every speculating sequence (its whole prompt the first time), then k - 1
    single tokens; its own paged cache (no prefix caching) is rolled back to the tokens the target
    kept, and freed once a sequence stops running."""

    def __init__(
        self,
        model: Model,
        block_size: int,
        max_model_len: int,
        sequences: int,
        k: int,
        vocab: int,
        chunk: int,
    ) -> None:
        """`vocab`: the target's vocabulary (a guess beyond it is dropped); `chunk`: the most tokens
        one sequence feeds the draft in one forward (its prompt is caught up on in chunks)."""
        text = model.config.text
        weight = model.decoder.norm.weight
        kv_heads = model.decoder.layers[0].self_attn.num_kv_heads
        per_token = KVStore.bytes_per_token(text.num_layers, kv_heads, text.head_dim, weight.dtype)
        wanted = math.ceil(sequences * (max_model_len + k) / block_size)
        num_blocks = max(1, min(wanted, int(DRAFT_CACHE_GIB * (1 << 30) // (per_token * block_size))))
        store = KVStore(
            text.num_layers, num_blocks, block_size, kv_heads, text.head_dim, weight.dtype, weight.device
        )
        self.runner = Runner(model, store, block_size)  # eager, library kernels: only its guesses count
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.max_len = min(max_model_len, text.max_position_embeddings)
        self.vocab, self.chunk = vocab, chunk
        self.shadows: dict[int, Sequence] = {}  # the target sequence's id → the draft's view of it

    def propose(self, wanted: list[tuple[Sequence, int]]) -> None:
        """Sets each sequence's `draft` to up to k guesses (k given with it)."""
        live: list[tuple[Sequence, Sequence, int]] = []
        for seq, k in wanted:
            if len(seq) + k > self.max_len:
                continue
            shadow = self.shadows.get(seq.seq_id)
            if shadow is None:
                shadow = Sequence(seq.seq_id, seq.request_id, seq.index, seq.prompt, seq.params, seq.arrival)
                self.shadows[seq.seq_id] = shadow
            shadow.output = seq.output  # the same list: what the target keeps, the draft sees
            shadow.draft = []
            live.append((seq, shadow, k))
        stuck: set[int] = set()  # the draft's cache had no room for more of these
        while behind := [
            s for _, s, _ in live if len(s) - s.num_computed > self.chunk and s.seq_id not in stuck
        ]:
            items = []
            for shadow in behind:  # a long backlog (a prompt) in chunks, all but the last
                if self.blocks.allocate(shadow, self.chunk):
                    items.append((shadow, self.chunk))
                else:
                    stuck.add(shadow.seq_id)
            if items:
                self.runner.run(items)
                for shadow, n in items:
                    shadow.num_computed += n
        for _ in range(max((k for _, _, k in live), default=0)):
            items = []
            for _, shadow, k in live:
                n = len(shadow) + len(shadow.draft) - shadow.num_computed
                if len(shadow.draft) >= k or shadow.seq_id in stuck:
                    continue
                if self.blocks.allocate(shadow, n):
                    items.append((shadow, n))
                else:
                    stuck.add(shadow.seq_id)
            if not items:
                break
            logits = self.runner.run(items)
            for (shadow, n), row in zip(items, logits, strict=True):
                shadow.num_computed += n
                guess = int(torch.argmax(row))
                if guess < self.vocab:
                    shadow.draft.append(guess)
                else:  # a token the target does not have (a wider padded vocabulary): stop there
                    stuck.add(shadow.seq_id)
        for seq, shadow, _ in live:
            seq.draft = list(shadow.draft)

    def release(self, seq_id: int) -> None:
        """Frees a sequence's part of the draft's cache (it finished, or was aborted or preempted)."""
        shadow = self.shadows.pop(seq_id, None)
        if shadow is not None:
            self.blocks.release(shadow)

    def sync(self, running: list[Sequence]) -> None:
        """Each step, before proposing: the draft's view of every running sequence rolled back to the
        tokens the target kept (its guesses past them are gone), and the cache of every sequence no
        longer running (preempted) freed."""
        current = {seq.seq_id: seq for seq in running}
        for seq_id, shadow in list(self.shadows.items()):
            seq = current.get(seq_id)
            if seq is None:
                self.release(seq_id)
            else:
                shadow.num_computed = min(shadow.num_computed, seq.num_computed)
