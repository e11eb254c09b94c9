"""The one attention interface the model calls, and the pure-PyTorch reference kernel.

The model never sees caches or request layouts: each decoder layer hands its freshly
projected q/k/v for the flat token batch to an `AttentionBackend`, which knows which tokens
belong to which sequence and what is already cached (a dense cache in the reference loop, a
paged cache in the engine)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the T new tokens of this forward (rotary already
        applied). Stores k/v as the backend sees fit and returns the attention output [T, Hq, D]."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one sequence's Tq newest queries over its Tk >= Tq keys.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] -> [Tq, Hq, D]. Query i sits at position Tk - Tq + i.
    A single query (decode) uses two grouped matmuls: on CPU that is 4-10x faster than SDPA,
    whose kernels are tuned for long query blocks."""
    tq, tk = q.shape[0], k.shape[0]
    if tq == 1:
        hkv, d = k.shape[1], k.shape[2]
        qg = q.view(hkv, -1, d)  # query heads grouped by the KV head they share
        scores = torch.bmm(qg, k.permute(1, 2, 0)) * d**-0.5
        return torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1)).view(1, -1, d)
    if tq == tk:
        mask, causal = None, True
    else:
        rows = torch.arange(tk - tq, tk, device=q.device)[:, None]
        mask, causal = torch.arange(tk, device=q.device)[None, :] <= rows, False
    out = F.scaled_dot_product_attention(  # batched 4-D: 3-D inputs fall to the slow math kernel
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)
