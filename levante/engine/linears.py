"""Which kernel runs the decoder's linear layers and norms: a transform on a loaded model, applied
once by the engine that serves it (the model files know nothing of it).

Batch-invariant mode puts every decoder projection and the LM head on Levante's own kernel
(`kernels.linear`), and the norms on `kernels.rms_norm`, whose result for a row is the same bits
whatever else is in the batch. The
library kernels are not: MKL (float32) and oneDNN (bfloat16) choose blockings by the number of
rows, and measured here even a row's place within the same batch size changes its bits. Without
the mode, bfloat16 weights on CPU are packed for oneDNN once instead of on every call. GGUF blocks
are laid out once for their kernel's loads in either mode (`PackedQuantLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from levante import kernels
from levante.model import Model
from levante.model.layers import PackedLinear, RMSNorm, pack_linears
from levante.model.quantized import QuantLinear


class KernelLinear(nn.Module):
    """A bias-free Linear computed by `kernels.linear`, over its weight packed once (`kernels.pack`:
    a copy, so a tied LM head no longer shares the embedding's table: the price of reading it as
    one stream)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert linear.bias is None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = kernels.pack(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.out_features)


class PackedQuantLinear(nn.Module):
    """A `QuantLinear` over its blocks laid out once by `kernels.pack_quant` (16 rows' words per
    cache line: loads, not gathers, in decode). The same codes, so the same bits; the raw blocks
    stay with the `QuantLinear` (a tied embedding keeps its own)."""

    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qtypes = linear.qtypes
        first = 0
        for i, w in enumerate(linear.weights):  # packed rows come in whole groups of 16
            packs = first % 16 == 0
            self.register_buffer(f"blocks{i}", kernels.pack_quant(w.blocks, w.qtype) if packs else w.blocks)
            first += w.blocks.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [getattr(self, f"blocks{i}") for i in range(len(self.qtypes))]
        return kernels.quant_linear(x, blocks, self.qtypes, self.in_features)


class KernelRMSNorm(nn.Module):
    """An RMSNorm computed by `kernels.rms_norm`: the sum of squares in a fixed order per row (the
    same bits in any batch), in one call."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def _children(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()]


def use_linear_kernels(model: Model, batch_invariant: bool) -> bool:
    """Puts the decoder's linear layers on the kernel the mode asks for; returns whether they are
    now batch-invariant (False where Levante's kernels cannot run: not on CPU, float16, or no
    compiler). The vocab-parallel LM head takes the kernel through its own `kernel` attribute, so
    its gather stays its own."""
    weight = model.decoder.norm.weight
    on_cpu = weight.device.type == "cpu"
    if on_cpu and kernels.load():  # GGUF blocks: their kernel is batch-invariant in either mode
        quantized = [
            (parent, name)
            for parent, name, child in _children(model.decoder)
            if isinstance(child, QuantLinear)
        ]
        for parent, name in quantized:  # one at a time, so each raw copy can go before the next is packed
            setattr(parent, name, PackedQuantLinear(getattr(parent, name)))
    if batch_invariant and on_cpu and weight.dtype in (torch.float32, torch.bfloat16) and kernels.load():
        for parent, name, child in _children(model.decoder):
            if isinstance(child, PackedLinear):
                raise ValueError("this model's weights were packed for oneDNN; load it again")
            if isinstance(child, nn.Linear):
                setattr(parent, name, KernelLinear(child))
            elif isinstance(child, RMSNorm):
                setattr(parent, name, KernelRMSNorm(child))
            elif hasattr(child, "kernel"):
                child.kernel = kernels.linear
        return True
    if on_cpu and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        pack_linears(model.decoder)
    return False
