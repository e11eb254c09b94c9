"""Row orders of q/k projections. The model applies HF (rotate-half) RoPE, which pairs row i of a
head with row i + head_dim/2; Mistral-native and llama.cpp GGUF files pair rows 2i and 2i+1
(interleaved, complex-number RoPE). Only q and k are affected: v and everything else never is."""

from __future__ import annotations

import torch

from levante.config import ModelConfig


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rows → rotate-half rows, head by head (any trailing dims)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows → interleaved rows: the inverse of `to_rotate_half`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotary_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads the rows of this (internal-named) tensor split into when RoPE reads it;
    None when RoPE does not read it."""
    if name.endswith("self_attn.q_proj.weight"):
        return config.text.num_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.text.num_kv_heads
    if (
        config.vision
        and name.startswith("vision.")
        and name.endswith(("attention.q_proj.weight", "attention.k_proj.weight"))
    ):
        return config.vision.num_heads
    return None
