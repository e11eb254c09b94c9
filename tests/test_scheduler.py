"""Property tests of the block manager and scheduler without a model: random arrivals, aborts,
finishes and preemptions must never leak a block, double-own one, or lose a request."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from levante.engine.kv_cache import BlockManager
from levante.engine.sampling_params import SamplingParams
from levante.engine.scheduler import Scheduler
from levante.engine.sequence import Sequence, Status

BLOCK = 4


def check_ownership(blocks: BlockManager, seqs: list[Sequence]) -> None:
    """A block's reference count is exactly the number of block tables that hold it."""
    blocks.check()
    owners = Counter(b for s in seqs if not s.finished for b in s.block_table)
    for block in range(blocks.num_blocks):
        assert owners[block] == blocks.ref[block], block
    for s in seqs:
        if s.status is Status.RUNNING:
            assert len(s.block_table) * BLOCK >= s.num_computed


events = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "step", "step", "step", "abort"]),
        st.integers(1, 48),  # prompt length
        st.integers(0, 3),  # prompt family: shared prefixes hit the cache
        st.integers(1, 12),  # max output tokens
        st.integers(0, 2),  # priority
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events=events, num_blocks=st.integers(12, 40), budget=st.integers(4, 64), caching=st.booleans())
def test_random_traffic_keeps_blocks_consistent(
    events: list[tuple[str, int, int, int, int]], num_blocks: int, budget: int, caching: bool
) -> None:
    blocks = BlockManager(num_blocks, BLOCK, prefix_caching=caching)
    sched = Scheduler(blocks, max_num_seqs=6, max_num_batched_tokens=budget)
    seqs: list[Sequence] = []
    ended: set[int] = set()

    def step() -> None:
        batch = sched.schedule()
        for seq in batch.out_of_memory:
            sched.remove(seq)
            ended.add(seq.seq_id)
        for seq, n in batch.items:
            assert n >= 1 and seq.status is Status.RUNNING
            seq.num_computed += n
            if seq.num_computed == len(seq):  # a sample: one more token, maybe the last
                seq.output.append(7)
                if len(seq.output) >= seq.params.max_tokens:
                    sched.remove(seq)
                    ended.add(seq.seq_id)
        assert batch.num_tokens <= budget
        assert len({s.seq_id for s, _ in batch.items}) == len(batch.items)
        check_ownership(blocks, seqs)

    for kind, length, family, max_tokens, priority in events:
        if kind == "arrive" and length + 1 <= num_blocks * BLOCK:  # the engine's admission rule
            prompt = [family] * (length // 2) + list(range(100, 100 + length - length // 2))
            params = SamplingParams(max_tokens=max_tokens, priority=priority)
            seq = Sequence(len(seqs), f"r{len(seqs)}", 0, prompt, params, arrival=float(len(seqs)))
            seqs.append(seq)
            sched.add(seq)
        elif kind == "abort" and seqs:
            victim = seqs[(length * 7) % len(seqs)]
            if not victim.finished:
                sched.remove(victim)
                ended.add(victim.seq_id)
        else:
            step()
        check_ownership(blocks, seqs)

    for _ in range(2000):  # drain: everything must finish, no deadlock, no starvation
        if not sched.has_work():
            break
        step()
    assert not sched.has_work()
    assert ended == {s.seq_id for s in seqs}
    assert all(s.finished for s in seqs)
    assert blocks.num_free == num_blocks
    assert all(r == 0 for r in blocks.ref)


def test_prefix_blocks_are_shared_and_survive_release() -> None:
    blocks = BlockManager(16, BLOCK)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(1, 14))  # 3 full blocks + 1 token
    first = Sequence(0, "a", 0, prompt, SamplingParams(max_tokens=4), 0.0)
    sched.add(first)
    ((seq, n),) = sched.schedule().items
    assert n == 13
    seq.num_computed += n
    sched.remove(first)
    assert blocks.num_free == 16 and len(blocks.cached) == 3  # freed, but still cached

    second = Sequence(1, "b", 0, [*prompt[:12], 99, 98], SamplingParams(max_tokens=4), 1.0)
    sched.add(second)
    ((seq, n),) = sched.schedule().items
    assert (seq.num_cached, n) == (12, 2)  # only the suffix is computed
    assert blocks.prefix_hits == 12 and blocks.prefix_queries == 27


def run_step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    batch = sched.schedule()
    for seq, n in batch.items:
        seq.num_computed += n
        if seq.num_computed == len(seq):
            seq.output.append(7)
    return batch.items


def test_preemption_frees_the_latest_arrival_and_recomputes_it() -> None:
    blocks = BlockManager(4, BLOCK, prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    old = Sequence(0, "old", 0, [1] * 8, SamplingParams(), 0.0)
    new = Sequence(1, "new", 0, [2] * 7, SamplingParams(), 1.0)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 blocks each, the pool is full
    assert blocks.num_free == 0
    batch = sched.schedule()  # old's 9th token needs a third block: new is preempted
    assert batch.preempted == [new] and [s for s, _ in batch.items] == [old]
    assert new.status is Status.WAITING and new.num_computed == 0 and not new.block_table
    assert new.num_preemptions == 1 and len(new) == 8  # its sampled token is kept and recomputed


def test_a_lone_sequence_that_outgrows_the_pool_is_reported() -> None:
    blocks = BlockManager(2, BLOCK)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence(0, "a", 0, [1] * 7, SamplingParams(), 0.0)
    sched.add(seq)
    run_step(sched)
    batch = sched.schedule()  # 8 tokens fit two blocks; the 9th cannot
    assert batch.out_of_memory == [] and batch.items == [(seq, 1)]
    seq.num_computed += 1
    seq.output.append(7)
    batch = sched.schedule()
    assert batch.out_of_memory == [seq] and not batch.items
