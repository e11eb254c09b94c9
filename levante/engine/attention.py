"""Attention backends over the paged KV cache. The model calls one per layer with the new
tokens' q/k/v; the backend writes k/v into their slots, then attends each sequence over its
blocks. Writes happen for the whole batch before any read, so a sequence may read blocks that
another one fills in the same forward (prefix-cache hits scheduled in the same step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from levante import kernels
from levante.engine.kv_cache import KVStore
from levante.model import causal_attention


@dataclass
class BatchLayout:
    """Where this forward's tokens go and what each sequence attends over; built once per step
    and shared by every layer. Rows are either in a prefill chunk (attended together) or paged:
    each attended alone over its sequence's blocks (decode rows; every row in batch-invariant mode)."""

    slots: torch.Tensor  # [T] cache slot of each new token
    prefills: list[tuple[int, int, torch.Tensor | None]]  # (first row, rows, context slots; None: no past)
    rows: torch.Tensor  # [R] the paged rows
    seqs: torch.Tensor  # [R] the index of each one's sequence in `tables`
    tables: torch.Tensor  # [S, blocks] block tables of those sequences, padded with block 0
    lens: torch.Tensor  # [R] each paged row's context length, itself included


class TorchPagedAttention:
    """Pure-PyTorch backend (CPU; the reference in tests). Paged rows are attended together:
    one block-granular gather and two batched matmuls per layer, instead of a call per sequence.
    A GPU kernel backend implements the same call without touching the model or the scheduler."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.layout: BatchLayout | None = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        assert layout is not None, "set the batch layout before the forward"
        kc, vc = self.store.k[layer], self.store.v[layer]  # [Hkv, slots, D]
        self._write(layer, layout.slots, k, v)
        out = q.new_empty(q.shape)  # dense even when q is a slice of a wider projection
        for start, n, ctx in layout.prefills:
            if ctx is None and kc.dtype == k.dtype:  # nothing cached before: its own k/v are the context
                keys, values = k[start : start + n], v[start : start + n]
            else:  # as cached (an fp8 cache's rounding included), in q's dtype
                where = layout.slots[start : start + n] if ctx is None else ctx
                keys, values = (c[:, where].transpose(0, 1).to(q.dtype) for c in (kc, vc))
            out[start : start + n] = causal_attention(q[start : start + n], keys, values)
        if layout.rows.numel():
            self._paged(q, kc, vc, layout, out)
        return out

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.store.write(layer, slots, k, v)

    def _paged(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, layout: BatchLayout, out: torch.Tensor
    ) -> None:
        """Fills `out`'s paged rows from the same rows of q, each over its own blocks."""
        rows = layout.rows
        q = q[rows]
        b, hq, d = q.shape
        hkv, bs = kc.shape[0], self.store.block_size
        blocks = layout.tables[layout.seqs].view(-1)
        keys = (
            torch.index_select(kc.view(hkv, -1, bs * d), 1, blocks).view(hkv, b, -1, d).to(q.dtype)
        )  # [Hkv, B, L, D]
        values = torch.index_select(vc.view(hkv, -1, bs * d), 1, blocks).view(hkv, b, -1, d).to(q.dtype)
        qg = q.view(b, hkv, hq // hkv, d).transpose(0, 1)  # [Hkv, B, g, D]
        scores = torch.matmul(qg, keys.transpose(2, 3)) * d**-0.5
        pad = torch.arange(keys.shape[2], device=q.device) >= layout.lens[:, None]  # [B, L]
        scores.masked_fill_(pad[None, :, None, :], float("-inf"))
        attended = torch.matmul(torch.softmax(scores, dim=-1), values)  # [Hkv, B, g, D]
        out[rows] = attended.transpose(0, 1).reshape(b, hq, d)


class CpuPagedAttention(TorchPagedAttention):
    """Same writes and prefill path as the pure-PyTorch backend; paged rows go to Levante's CPU
    kernel, which walks each row's block table instead of gathering a padded copy per layer, and
    whose result for a row depends on that row alone. K/V are written by one kernel call per layer,
    which a compiled step turns into an in-place write (an indexed assignment into a layer's view of
    the cache would be traced as a copy of the whole cache)."""

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        torch.ops.levante.write_kv(self.store.k, self.store.v, layer, slots, k, v)

    def _paged(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, layout: BatchLayout, out: torch.Tensor
    ) -> None:
        torch.ops.levante.paged_attention(
            q, kc, vc, layout.rows, layout.seqs, layout.tables, layout.lens, self.store.block_size, out
        )


def paged_attention(store: KVStore) -> TorchPagedAttention:
    """The fastest backend for the cache's device and dtype."""
    kinds = (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
    if store.k.device.type == "cpu" and store.k.dtype in kinds and kernels.load():
        return CpuPagedAttention(store)
    return TorchPagedAttention(store)
