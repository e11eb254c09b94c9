"""Layers over GGUF-quantized weights, kept in memory as the file stores them (llama.cpp's blocks):
the loader puts them where a checkpoint's tensor is quantized, the model files know nothing of it.

Their kernels (`levante.kernels.quant_linear`) dequantize a few output rows at a time and give the
same bits as the dense kernel on the dequantized weight, so a model keeps its numbers, and its
batch invariance, at a quarter to a half of the memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from torch import nn

from levante import kernels

# ggml type id -> (weights per block, bytes per block): the types the kernels decode
BLOCKS: dict[int, tuple[int, int]] = {
    2: (32, 18),
    3: (32, 20),
    8: (32, 34),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
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
        return kernels.dequantize(self.blocks, self.qtype, self.cols, dtype)


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


# --quantization: what each scheme makes of a float checkpoint's decoder projections and LM head
# (int4 keeps the head at int8, as llama.cpp's recipes keep `output.weight` at higher precision)
SCHEMES: dict[str, tuple[GGMLQuantizationType, GGMLQuantizationType]] = {
    "int8": (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_0),  # symmetric, group 32, fp16 scale
    "int4": (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0),  # asymmetric, group 32, fp16 scale+min
}


def quantizer(scheme: str) -> Callable[[str, torch.Tensor], torch.Tensor | QuantizedTensor]:
    """The load-time transform `--quantization scheme` asks for: given a parameter's name and float
    value, the value to load. Decoder projections and the LM head become GGUF blocks (gguf's own
    quantizer, so the result is what llama.cpp's quantize writes for that type); the embedding
    table, norms and the vision tower stay in the compute dtype."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    layers, head = SCHEMES[scheme]

    def transform(name: str, value: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        if name == "decoder.lm_head.weight":
            qtype = head
        elif name.startswith("decoder.layers.") and name.endswith("_proj.weight"):
            qtype = layers
        else:
            return value
        if value.shape[1] % BLOCKS[int(qtype)][0]:
            return value  # rows that do not split into whole blocks stay as they are
        blocks = quantize(value.float().numpy(), qtype)
        return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(blocks)), int(qtype), value.shape[1])

    return transform
