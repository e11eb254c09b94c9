"""The compiled CPU decode kernel against the pure-PyTorch paged backend (the reference) on
random batches: prefill chunks with and without a cached past beside decode rows of varied
lengths, blocks scattered over the cache, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from levante.engine.attention import BatchLayout, TorchPagedAttention
from levante.engine.cpu_attention import CpuPagedAttention, kernel
from levante.engine.kv_cache import KVStore

BLOCK, HKV, HQ, D = 16, 2, 6, 32


def random_step(gen: torch.Generator, store: KVStore, shapes: list[tuple[int, int]]) -> BatchLayout:
    """A layout for sequences given as (tokens already cached, tokens fed now), each on its own
    random blocks; the cache's unused slots hold random values that must never leak in."""
    free = torch.randperm(store.k.shape[2] // BLOCK, generator=gen).tolist()
    slots, prefills, rows, tables, lens, row = [], [], [], [], [], 0
    for past, n in shapes:
        end = past + n
        table = [free.pop() for _ in range(-(-end // BLOCK))]
        seq_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(end)]
        slots += seq_slots[past:]
        if n == 1:
            rows.append(row)
            tables.append(table)
            lens.append(end)
        else:
            prefills.append((row, n, torch.tensor(seq_slots) if past else None))
        row += n
    width = max(map(len, tables), default=0)
    return BatchLayout(
        slots=torch.tensor(slots),
        prefills=prefills,
        decode_rows=torch.tensor(rows, dtype=torch.long),
        decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(
            len(tables), width
        ),
        decode_lens=torch.tensor(lens, dtype=torch.long),
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
def test_kernel_matches_the_pytorch_backend(dtype: torch.dtype, shapes: list[tuple[int, int]]) -> None:
    ext = kernel()
    assert ext is not None, "the CPU kernel did not build"
    gen = torch.Generator().manual_seed(len(shapes))
    stores = [KVStore(1, 160, BLOCK, HKV, D, dtype, "cpu") for _ in range(2)]
    noise = torch.randn(stores[0].k.shape, generator=gen).to(dtype)
    for store in stores:
        store.k.copy_(noise)
        store.v.copy_(noise.flip(-1))
    layout = random_step(gen, stores[0], shapes)
    tokens = sum(n for _, n in shapes)
    q, k, v = (torch.randn(tokens, h, D, generator=gen).to(dtype) for h in (HQ, HKV, HKV))
    ref_backend, cpu_backend = TorchPagedAttention(stores[0]), CpuPagedAttention(stores[1], ext)
    ref_backend.layout = cpu_backend.layout = layout
    expected, got = ref_backend(0, q, k, v), cpu_backend(0, q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert torch.equal(stores[0].k, stores[1].k) and torch.equal(stores[0].v, stores[1].v)


def test_kernel_reads_q_rows_of_a_wider_projection() -> None:
    """The model hands q as a slice of its fused q/k/v projection: rows strided, heads dense."""
    ext = kernel()
    assert ext is not None
    gen = torch.Generator().manual_seed(0)
    store = KVStore(1, 16, BLOCK, HKV, D, torch.float32, "cpu")
    store.k.normal_(generator=gen)
    store.v.normal_(generator=gen)
    layout = random_step(gen, store, [(30, 1), (5, 1)])
    qkv = torch.randn(2, HQ + 2 * HKV, D, generator=gen)
    q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
    backend = CpuPagedAttention(store, ext)
    backend.layout = layout
    torch.testing.assert_close(backend(0, q, k, v), backend(0, q.contiguous(), k, v))
