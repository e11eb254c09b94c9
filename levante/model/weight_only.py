"""GGUF blocks on a GPU: torch's weight-only kernels (tinygemm int4, int8 per row), where Levante's
integer CPU kernel (`quantized.QuantLinear`) does not run.

The 4-bit types carry over exactly: their codes are tinygemm's, and every group of 32 (64, 128)
weights is w = (q − 8)·s + z with, per type (the file's fp16 scales, exact products in float32):
  Q4_0  w = d·(q − 8)             s = d        z = 0
  Q4_1  w = d·q + m               s = d        z = m + 8d       (Levante's int4 g64/g128 alike)
  Q4_K  w = d·sc_j·q − dmin·m_j   s = d·sc_j   z = 8·d·sc_j − dmin·m_j   (sub-block j of 32)
tinygemm keeps s and z in bfloat16 (≤ 2⁻⁹ relative each). The other types (Q8_0, Q5_K, Q6_K) do
not fit 4 bits: they become int8 per row (`_weight_int8pack_mm`), which adds up to half a step of
the row's largest weight / 127 per weight. The module runs on CPU too (that is how it is tested
here), where torch's `_for_cpu` int4 kernel takes its own packing."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from levante.model.quantized import BLOCKS, INT4_GROUPS, QuantEmbedding, QuantizedTensor, QuantLinear

Q4_0, Q4_1, Q4_K = (
    int(t) for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
)
INT4_TYPES = {Q4_0, Q4_1, Q4_K, *INT4_GROUPS.values()}


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes → [...] float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def int4_groups(t: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A 4-bit GGUF tensor → (codes uint8 [N, K] in 0..15, scales and zeros float32 [K/G, N, 2], G):
    the same weights as `w = (q − 8)·s + z` per group of G."""
    n, k = t.shape
    if t.qtype == Q4_K:
        b = t.blocks.view(n, k // 256, 144)
        d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
        s = b[..., 4:16].int()  # 12 bytes of 6-bit scales and mins (llama.cpp's get_scale_min_k4)
        low = [s[..., j] & 63 for j in range(4)], [s[..., j + 4] & 63 for j in range(4)]
        high = (
            [(s[..., j + 8] & 15) | ((s[..., j] >> 6) << 4) for j in range(4)],
            [(s[..., j + 8] >> 4) | ((s[..., j + 4] >> 6) << 4) for j in range(4)],
        )
        sc = torch.stack(low[0] + high[0], -1).float()  # [N, blocks, 8]
        mn = torch.stack(low[1] + high[1], -1).float()
        qs = b[..., 16:].view(n, k // 256, 4, 32)  # 64 weights per 32 bytes: low nibbles, then high
        codes = torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, k)
        scale = d[..., None] * sc
        zero = 8 * scale - dmin[..., None] * mn
        group = 32
    else:
        group, size = BLOCKS[t.qtype]  # Q4_0, Q4_1 and its widenings: one scale (and min) per block
        b = t.blocks.view(n, k // group, size)
        head = 2 if t.qtype == Q4_0 else 4
        qs = b[..., head:].view(n, k // group, group // 32, 16)  # element i and i + 16 share a byte
        codes = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, k)
        scale = _fp16(b[..., 0:2])
        zero = torch.zeros_like(scale) if t.qtype == Q4_0 else _fp16(b[..., 2:4]) + 8 * scale
    pairs = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], dim=-1)  # [N, K/G, 2]
    return codes, pairs.transpose(0, 1).contiguous(), group


def int8_rows(t: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any GGUF tensor → (int8 [N, K], bfloat16 scale [N]): w ≈ q·scale, scale = max|w| / 127."""
    w = t.dequantize(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    return torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8), scale


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


class WeightOnlyLinear(nn.Module):
    """A bias-free Linear over GGUF weights converted for torch's weight-only kernels (bfloat16
    activations); merged projections keep a kernel per part (their types may differ) and
    concatenate the outputs."""

    def __init__(self, *weights: QuantizedTensor, device: torch.device | str) -> None:
        super().__init__()
        device = torch.device(device)
        self.in_features = weights[0].cols
        self.out_features = sum(w.shape[0] for w in weights)
        self.kinds: list[tuple[str, int]] = []  # ("int4", group) or ("int8", 0) per part
        for i, w in enumerate(weights):
            if w.qtype in INT4_TYPES and w.shape[0] % 16 == 0 and w.cols % 32 == 0:
                codes, pairs, group = int4_groups(w)
                self.register_buffer(f"w{i}", _pack_int4(codes.to(device)))
                self.register_buffer(f"s{i}", pairs.to(device=device, dtype=torch.bfloat16))
                self.kinds.append(("int4", group))
            else:
                q, scale = int8_rows(w)
                self.register_buffer(f"w{i}", q.to(device))
                self.register_buffer(f"s{i}", scale.to(device))
                self.kinds.append(("int8", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        outs = []
        for i, (kind, group) in enumerate(self.kinds):
            w, s = getattr(self, f"w{i}"), getattr(self, f"s{i}")
            if kind == "int8":
                outs.append(torch.ops.aten._weight_int8pack_mm(rows, w, s))
            elif rows.is_cuda:
                outs.append(torch.ops.aten._weight_int4pack_mm(rows, w, group, s))
            else:
                outs.append(torch.ops.aten._weight_int4pack_mm_for_cpu(rows, w, group, s))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernels={self.kinds}"


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 → tinygemm's packed layout on their device (CUDA: bytes of two codes,
    the even element in the high nibble; CPU: int32 codes, packed by the CPU's own kernel)."""
    k = codes.shape[1]
    if codes.is_cuda:
        pairs = (codes[:, ::2] << 4) | codes[:, 1::2]
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(k))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), _inner_k_tiles(k))


def use_weight_only_kernels(model: nn.Module, device: torch.device | str) -> int:
    """Moves a loaded model's GGUF blocks (`QuantLinear`, `QuantEmbedding`, on the CPU as the file
    maps them) to `device` as torch's weight-only kernels take them, module by module, so the GPU
    never holds a dequantized copy of a matrix; embedding tables are dequantized (a lookup reads a
    few rows). Returns the number of projections converted."""
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, name, WeightOnlyLinear(*child.weights, device=device))
                converted += 1
            elif isinstance(child, QuantEmbedding):
                table = child.weight.dequantize(child.dtype).to(device)
                setattr(parent, name, nn.Embedding.from_pretrained(table, freeze=True))
    return converted
