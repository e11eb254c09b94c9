"""Building blocks shared by the text decoder and the vision encoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from levante.model.quantized import QuantLinear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def merge_linears(*parts: nn.Module) -> nn.Module:
    """One bias-free Linear whose output is the parts' outputs side by side, so projections of the
    same input run as one matmul (one pass over the input, one kernel call); quantized parts stack
    in one `QuantLinear` without being copied."""
    if all(isinstance(p, QuantLinear) for p in parts):
        return QuantLinear(*(w for p in parts for w in p.weights))
    assert all(p.bias is None for p in parts), "only bias-free projections are merged"
    merged = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device="meta")
    merged.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    return merged


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight oneDNN reorders once into its blocked layout. For bfloat16
    on CPU, `F.linear` reorders the weight on every call, which costs as much as the matmul itself
    at decode batch sizes; the packed product is bit-identical."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert linear.bias is None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_linears(module: nn.Module) -> None:
    """Replaces every bias-free Linear under `module` by its `PackedLinear`."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.bias is None
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) — the SiLU-gated MLP of Mistral, Llama and Pixtral. Checkpoints
    store gate and up apart, so they are loaded apart; `merge` then fuses them into `gate_up_proj`,
    which the forward uses."""

    gate_up_proj: nn.Module

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = activation(act)

    def merge(self) -> None:
        self.gate_up_proj = merge_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of plain RoPE, computed in float32 like the reference so that large
    θ (1e9 for Mistral Small) rounds the same way."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for rotate-half RoPE from per-token angles [T, head_dim/2] -> [T, 1, head_dim]."""
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [T, heads, head_dim]; q/k weights are stored in the matching HF order."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
