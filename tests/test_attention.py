"""The compiled CPU attention kernel against the pure-PyTorch paged backend (the reference) on
random batches: prefill chunks with and without a cached past beside decode rows of varied
lengths, blocks scattered over the cache, in float32 and bfloat16; and the batch-invariant
layout, where the kernel attends every row (prefill rows too) alone."""

from __future__ import annotations

import pytest
import torch

from levante import kernels
from levante.engine.attention import BatchLayout, CpuPagedAttention, TorchPagedAttention
from levante.engine.kv_cache import KVStore

BLOCK, HKV, HQ, D = 16, 2, 6, 32


def random_step(
    gen: torch.Generator, store: KVStore, shapes: list[tuple[int, int]], all_paged: bool = False
) -> BatchLayout:
    """A layout for sequences given as (tokens already cached, tokens fed now), each on its own
    random blocks; the cache's unused slots hold random values that must never leak in. Single
    tokens are paged rows; chunks are prefills, or paged rows too with `all_paged`."""
    free = torch.randperm(store.k.shape[2] // BLOCK, generator=gen).tolist()
    slots, prefills, rows, seqs, tables, lens, row = [], [], [], [], [], [], 0
    for past, n in shapes:
        end = past + n
        table = [free.pop() for _ in range(-(-end // BLOCK))]
        seq_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(end)]
        slots += seq_slots[past:]
        if n == 1 or all_paged:
            rows += range(row, row + n)
            seqs += [len(tables)] * n
            lens += range(past + 1, end + 1)
            tables.append(table)
        else:
            prefills.append((row, n, torch.tensor(seq_slots) if past else None))
        row += n
    width = max(map(len, tables), default=0)
    return BatchLayout(
        slots=torch.tensor(slots),
        prefills=prefills,
        rows=torch.tensor(rows, dtype=torch.long),
        seqs=torch.tensor(seqs, dtype=torch.long),
        tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(
            len(tables), width
        ),
        lens=torch.tensor(lens, dtype=torch.long),
    )


@pytest.mark.parametrize(
    "cache", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["same", "e4m3", "e5m2"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shapes",
    [
        [(0, 1)],
        [(40, 1), (0, 7), (3, 1), (15, 1), (16, 1), (100, 1), (20, 5), (63, 1)],
        [(i * 11 % 90, 1) for i in range(24)],
    ],
)
@pytest.mark.parametrize("all_paged", [False, True])
def test_kernel_matches_the_pytorch_backend(
    dtype: torch.dtype, shapes: list[tuple[int, int]], all_paged: bool, cache: torch.dtype | None
) -> None:
    """Also with an fp8 cache under float32/bfloat16 q (`--kv-cache-dtype`): both read the same
    stored values, so they agree as closely as with a cache in q's dtype."""
    assert kernels.load(), "the CPU kernels did not build"
    gen = torch.Generator().manual_seed(len(shapes))
    stores = [KVStore(1, 160, BLOCK, HKV, D, cache or dtype, "cpu") for _ in range(2)]
    noise = torch.randn(stores[0].k.shape, generator=gen)
    for store in stores:
        store.k.copy_(noise)
        store.v.copy_(noise.flip(-1))
    layout = random_step(gen, stores[0], shapes, all_paged)
    tokens = sum(n for _, n in shapes)
    q, k, v = (torch.randn(tokens, h, D, generator=gen).to(dtype) for h in (HQ, HKV, HKV))
    ref_backend, cpu_backend = TorchPagedAttention(stores[0]), CpuPagedAttention(stores[1])
    ref_backend.layout = cpu_backend.layout = layout
    expected, got = ref_backend(0, q, k, v), cpu_backend(0, q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert torch.equal(stores[0].k, stores[1].k) and torch.equal(stores[0].v, stores[1].v)


def test_kernel_reads_q_rows_of_a_wider_projection() -> None:
    """The model hands q as a slice of its fused q/k/v projection: rows strided, heads dense."""
    assert kernels.load()
    gen = torch.Generator().manual_seed(0)
    store = KVStore(1, 16, BLOCK, HKV, D, torch.float32, "cpu")
    store.k.normal_(generator=gen)
    store.v.normal_(generator=gen)
    layout = random_step(gen, store, [(30, 1), (5, 1)])
    qkv = torch.randn(2, HQ + 2 * HKV, D, generator=gen)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
    backend = CpuPagedAttention(store)
    backend.layout = layout
    torch.testing.assert_close(backend(0, q, k, v), backend(0, q.contiguous(), k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_paged_row_is_the_same_bits_whatever_else_is_attended(dtype: torch.dtype) -> None:
    """Each row's output depends on that row alone: a prompt's rows attended as one chunk equal
    the same rows attended one at a time, and beside other sequences' rows."""
    assert kernels.load()
    gen = torch.Generator().manual_seed(3)
    store = KVStore(1, 64, BLOCK, HKV, D, dtype, "cpu")
    store.k.normal_(generator=gen)
    store.v.normal_(generator=gen)
    backend = CpuPagedAttention(store)
    q = torch.randn(70, HQ, D, generator=gen).to(dtype)
    k, v = (torch.randn(70, HKV, D, generator=gen).to(dtype) for _ in range(2))
    backend.layout = random_step(torch.Generator().manual_seed(9), store, [(0, 37)], all_paged=True)
    whole = backend(0, q[:37], k[:37], v[:37])
    for i in (0, 15, 16, 36):  # the cache now holds the chunk: re-attend row i alone
        layout = random_step(torch.Generator().manual_seed(9), store, [(0, 37)], all_paged=True)
        layout.rows, layout.lens = layout.rows[i : i + 1], layout.lens[i : i + 1]
        layout.seqs, layout.slots = layout.seqs[i : i + 1], layout.slots[:0]
        backend.layout = layout
        assert torch.equal(backend(0, q[:37], k[:0], v[:0])[i], whole[i])
    mixed = random_step(torch.Generator().manual_seed(9), store, [(0, 37), (5, 1), (0, 32)], all_paged=True)
    backend.layout = mixed
    assert torch.equal(backend(0, q, k, v)[:37], whole)


@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_stores_what_the_pytorch_write_stores(dtype: torch.dtype, cache: torch.dtype) -> None:
    """One layer's k/v at scattered slots, the kernel's write (`levante::write_kv`, one call for k and
    v) against `KVStore.write`: the same bits, fp8 saturated at its largest finite value (k and v
    here reach ±1e5, past both formats' range), k a slice of a wider projection."""
    assert kernels.load(), "the CPU kernels did not build"
    gen = torch.Generator().manual_seed(3)
    stores = [KVStore(3, 4, BLOCK, HKV, D, cache, "cpu") for _ in range(2)]
    qkv = (torch.randn(5, 2 * HKV, D, generator=gen) * 3e4).to(dtype)
    k, v = qkv[:, :HKV], qkv[:, HKV:]
    slots = torch.tensor([3, 17, 40, 63, 0])
    stores[0].write(1, slots, k, v)
    torch.ops.levante.write_kv(stores[1].k, stores[1].v, 1, slots, k, v)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[stores[0].k.element_size()]
    for a, b in ((stores[0].k, stores[1].k), (stores[0].v, stores[1].v)):
        assert torch.equal(a.view(width), b.view(width))
        assert a[1].float().abs().amax() > 0 and a[[0, 2]].float().abs().amax() == 0  # layer 1 only

    with pytest.raises(RuntimeError, match="write_kv: slot 80 out of range"):  # past the 4+1 blocks
        torch.ops.levante.write_kv(stores[1].k, stores[1].v, 1, torch.tensor([80]), k[:1], v[:1])
