"""Layers over GGUF-quantized weights, kept in memory as the file stores them (llama.cpp's blocks):
the loader puts them where a checkpoint's tensor is quantized, the model files know nothing of it.

Their kernel (`levante.kernels.quant_linear`) takes integer dot products with x rounded to int8,
as llama.cpp does: batch-invariant, at a quarter to a half of the memory, near the speed of memory
in decode, and within x's rounding (~0.5%) of the dequantized weight's numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

from levante import kernels
from levante.errors import LevanteError

# ggml type id -> (weights per block, bytes per block): the types the kernels decode, and
# Levante's own int4 groups of 64 and 128 (see INT4_GROUPS)
BLOCKS: dict[int, tuple[int, int]] = {
    2: (32, 18),
    3: (32, 20),
    8: (32, 34),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    1064: (64, 36),
    1128: (128, 68),
}


@dataclass(frozen=True)
class QuantizedTensor:
    """A [rows, cols] weight as GGUF blocks: `blocks` is uint8 [rows, bytes per row]."""

    blocks: torch.Tensor
    qtype: int  # ggml's type id
    cols: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.shape[0], self.cols))

    def with_blocks(self, blocks: torch.Tensor) -> QuantizedTensor:
        """The same type over other rows (a row permutation or selection of these)."""
        return replace(self, blocks=blocks)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights as gguf's reference dequantizer gives them (by Levante's kernel where it
        builds, else by gguf's own code, which knows the file types)."""
        if kernels.load():
            return kernels.dequantize(self.blocks, self.qtype, self.cols, dtype)
        values = dequantize(self.blocks.cpu().numpy(), GGMLQuantizationType(self.qtype))
        return torch.from_numpy(values.reshape(self.shape)).to(dtype)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows [start, start + length) (dim 0), or columns (dim 1) where both ends fall on block
        boundaries (ValueError otherwise): a tensor-parallel rank's share, still quantized."""
        if dim == 0:
            return replace(self, blocks=self.blocks[start : start + length])
        elements, size = BLOCKS[self.qtype]
        if start % elements or length % elements:
            raise ValueError(f"columns [{start}, {start + length}) cut blocks of {elements} weights")
        first, count = start // elements * size, length // elements * size
        return replace(self, blocks=self.blocks[:, first : first + count], cols=length)

    def clone(self) -> QuantizedTensor:
        """A dense copy (the kernels read dense blocks; a column slice is not)."""
        return replace(self, blocks=self.blocks.clone(memory_format=torch.contiguous_format))


class QuantLinear(nn.Module):
    """A bias-free Linear over quantized weights, its output in the input's dtype. Several weights
    stack row-wise (merged projections): they stay separate tensors, since they may differ in type
    (llama.cpp's Q4_K_M recipe mixes Q4_K and Q6_K for attn_v) and are views of the mapped file,
    which a concatenation would copy (7.5 GB of gate/up for Mistral Small 3.2 in Q4_K)."""

    def __init__(self, *weights: QuantizedTensor) -> None:
        super().__init__()
        self.in_features = weights[0].cols
        assert all(w.cols == self.in_features for w in weights)
        self.out_features = sum(w.blocks.shape[0] for w in weights)
        self.qtypes = [w.qtype for w in weights]
        for i, w in enumerate(weights):
            self.register_buffer(f"blocks{i}", w.blocks)

    @property
    def weights(self) -> list[QuantizedTensor]:
        return [
            QuantizedTensor(getattr(self, f"blocks{i}"), t, self.in_features)
            for i, t in enumerate(self.qtypes)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, f"blocks{i}") for i in range(len(self.qtypes))]
        return kernels.quant_linear(x, blocks, self.qtypes, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtypes={self.qtypes}"


class QuantEmbedding(nn.Module):
    """An embedding table over a quantized weight: the rows looked up are dequantized to `dtype`."""

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.qtype, self.embedding_dim, self.dtype = weight.qtype, weight.cols, dtype
        self.register_buffer("blocks", weight.blocks)

    @property
    def weight(self) -> QuantizedTensor:
        return QuantizedTensor(self.blocks, self.qtype, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = kernels.dequantize(self.blocks[ids.reshape(-1)], self.qtype, self.embedding_dim, self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)


# `--quantization int4` groups: 32 is GGUF's Q4_1; 64 and 128 are Levante's own widening of it
# (csrc/quant.cpp), which llama.cpp cannot read but which saves the scale bytes
INT4_GROUPS: dict[int, int] = {32: 3, 64: 1064, 128: 1128}


def scheme_types(scheme: str) -> tuple[int, int]:
    """(projection type, LM head type) for `int8`, `int4` or `int4-g<group>`. int8 is Q8_0,
    symmetric per group of 32 with an fp16 scale; int4 is asymmetric (scale and min) per group, of
    32 by default. The LM head stays at int8, as llama.cpp's recipes keep `output.weight` higher."""
    int8 = int(GGMLQuantizationType.Q8_0)
    if scheme == "int8":
        return int8, int8
    if scheme == "int4":
        return INT4_GROUPS[32], int8
    name, _, group = scheme.partition("-g")
    if name == "int4" and group.isdigit() and int(group) in INT4_GROUPS:
        return INT4_GROUPS[int(group)], int8
    raise LevanteError(
        f"quantization must be int8, int4 or int4-g<group> with a group of "
        f"{', '.join(map(str, INT4_GROUPS))}, not {scheme!r}"
    )


def int4_blocks(w: np.ndarray, group: int) -> np.ndarray:
    """gguf's Q4_1 quantizer, the same arithmetic over groups of `group` weights: per group an fp16
    scale d = (max − min)/15 and min, then codes round((w − min)/d) in 32-weight chunks whose
    element i and i+16 share a byte. [N, K] float → uint8 [N, K/group · (4 + group/2)]."""
    rows = w.shape[0]
    g = w.reshape(-1, group).astype(np.float32)
    low, high = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    d = (high - low) / 15
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, 0, 1 / d)
    codes = np.trunc((g - low) * inverse + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    codes = codes.reshape(-1, group // 32, 2, 16)
    packed = (codes[..., 0, :] | (codes[..., 1, :] << np.uint8(4))).reshape(-1, group // 2)
    scales = [d.astype(np.float16).view(np.uint8), low.astype(np.float16).view(np.uint8)]
    return np.concatenate([*scales, packed], axis=-1).reshape(rows, -1)


def quantizer(scheme: str) -> Callable[[str, torch.Tensor], torch.Tensor | QuantizedTensor]:
    """The load-time transform `--quantization scheme` asks for: given a parameter's name and float
    value, the value to load. Decoder projections and the LM head become blocks (gguf's own
    quantizer for Q8_0, its Q4_1 arithmetic for int4, so group 32 is what llama.cpp's quantize
    writes); the embedding table, norms and the vision tower stay in the compute dtype."""
    layers, head = scheme_types(scheme)

    def transform(name: str, value: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        if name == "decoder.lm_head.weight":
            qtype = head
        elif name.startswith("decoder.layers.") and value.dim() == 2:  # the projections (norms are 1-D)
            qtype = layers
        else:
            return value
        group = BLOCKS[qtype][0]
        if value.shape[1] % group:
            raise LevanteError(
                f"{name}: its {value.shape[1]} input features do not split into groups of {group} "
                f"(--quantization {scheme})"
            )
        w = value.float().numpy()
        if qtype in INT4_GROUPS.values():
            blocks = int4_blocks(w, group)
        else:
            blocks = quantize(w, GGMLQuantizationType(qtype))
        return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, value.shape[1])

    return transform
