"""Continuous batching: which sequences run this step, and how many tokens each feeds.

Every step, running sequences go first (a decode is one token; an unfinished prefill continues
in a chunk), then waiting ones are admitted while the token budget, the sequence limit and the
block pool allow. A long prompt is fed in chunks of at most the budget, so it never stalls the
decodes beside it. When blocks run out, the lowest-priority running sequence (latest arrival on
ties) is preempted: its blocks are freed and it is recomputed later, cheaply if its prefix is
still cached."""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from levante.engine.kv_cache import BlockManager
from levante.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)
    out_of_memory: list[Sequence] = field(default_factory=list)  # alone and still cannot grow

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.waiting: list[tuple[int, float, int, Sequence]] = []  # heap: priority, arrival, order
        self.running: list[Sequence] = []
        self._order = itertools.count()

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, float, int]:
        return (seq.params.priority, seq.arrival, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        heapq.heappush(self.waiting, (seq.params.priority, seq.arrival, next(self._order), seq))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out wherever it is (finished or aborted) and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting = [entry for entry in self.waiting if entry[3] is not seq]
            heapq.heapify(self.waiting)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.image_embeds = None
        seq.draft.clear()
        seq.num_preemptions += 1
        batch.preempted.append(seq)
        self.add(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.token_budget
        self.running.sort(key=self._rank)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_remaining, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    batch.out_of_memory.append(seq)  # nothing left to take blocks from
                    break
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.items.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq was the last running sequence: alone and out of memory, or preempted itself

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0][3]
            hits = self.blocks.match_prefix(seq)
            n = min(seq.num_remaining, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.release(seq)  # its cached prefix stays cached for the next try
                break
            self.blocks.record_lookup(seq, hits)
            heapq.heappop(self.waiting)
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            batch.items.append((seq, n))
            budget -= n
        self._add_proposals(batch, budget)
        return batch

    def _add_proposals(self, batch: ScheduledBatch, budget: int) -> None:
        """Proposals (speculation) ride along only with what is left: once every sequence has its
        tokens, in the budget and the free blocks that remain, so they never preempt or delay one."""
        for index, (seq, n) in enumerate(batch.items):
            extra = min(len(seq.draft), budget) if n == seq.num_remaining else 0
            if extra and self.blocks.allocate(seq, n + extra):  # free blocks only: False changes nothing
                del seq.draft[extra:]
                batch.items[index] = (seq, n + extra)
                budget -= extra
            else:
                seq.draft.clear()
