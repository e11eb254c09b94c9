"""Attention backends over the paged KV cache. The model calls one per layer with the new
tokens' q/k/v; the backend writes k/v into their slots, then attends each sequence over its
blocks. Writes happen for the whole batch before any read, so a sequence may read blocks that
another one fills in the same forward (prefix-cache hits scheduled in the same step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from levante.engine.kv_cache import KVStore
from levante.model import causal_attention


@dataclass
class BatchLayout:
    """Where this forward's tokens go and what each sequence attends over."""

    slots: torch.Tensor  # [T] cache slot of each new token
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_slots: list[torch.Tensor]  # per sequence: slots of all its tokens so far, new ones included


class TorchPagedAttention:
    """Pure-PyTorch backend (CPU; the reference in tests). A GPU kernel backend implements the
    same call without touching the model or the scheduler."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.layout: BatchLayout | None = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self.layout is not None, "set the batch layout before the forward"
        kc, vc = self.store.k[layer], self.store.v[layer]
        kc[self.layout.slots] = k.to(kc.dtype)
        vc[self.layout.slots] = v.to(vc.dtype)
        out, start = [], 0
        for n, ctx in zip(self.layout.query_lens, self.layout.context_slots, strict=True):
            out.append(causal_attention(q[start : start + n], kc[ctx], vc[ctx]))
            start += n
        return torch.cat(out)
