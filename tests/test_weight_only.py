"""GGUF blocks for a GPU's weight-only kernels (tinygemm int4, int8 per row), run here through
torch's CPU twins of those kernels: the conversion is the same code on both devices, only the
final packing call differs (see levante/model/weight_only.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_quantized import _forward

from levante.loader import load_model
from levante.model.quantized import QuantEmbedding, QuantizedTensor, QuantLinear, int4_blocks
from levante.model.weight_only import WeightOnlyLinear, int4_groups, use_weight_only_kernels
from levante.testing.checkpoints import QUANT_MIX_SPEC, quant_mix_tensors, random_blocks, write_gguf

Q = GGMLQuantizationType


def _blocks(qtype: int, n: int, k: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """Random blocks of a GGUF type (or Levante's int4 g64/g128 of random floats) and the float32
    weights gguf's dequantizer (or Levante's) gives them."""
    rng = np.random.default_rng(qtype)
    if qtype > 1000:
        group = {1064: 64, 1128: 128}[qtype]
        t = QuantizedTensor(torch.from_numpy(int4_blocks(rng.standard_normal((n, k)), group)), qtype, k)
        return t, t.dequantize(torch.float32)
    raw = random_blocks(Q(qtype), (n, k), rng)
    return QuantizedTensor(torch.from_numpy(raw), qtype, k), torch.from_numpy(
        dequantize(raw, Q(qtype)).reshape(n, k).copy()
    )


@pytest.mark.parametrize(
    "qtype", [2, 3, 12, 1064, 1128], ids=["Q4_0", "Q4_1", "Q4_K", "int4-g64", "int4-g128"]
)
def test_4_bit_types_carry_over_to_tinygemm_exactly(qtype: int) -> None:
    """(q − 8)·s + z in float32 is gguf's weight bit for bit; through the kernel (bfloat16 x, s and
    z) the product is within 1% of float's (measured 0.21–0.27%)."""
    t, want = _blocks(qtype, 64, 512)
    codes, pairs, group = int4_groups(t)
    scale, zero = (pairs[..., i].t().repeat_interleave(group, dim=1) for i in (0, 1))
    assert torch.equal((codes.float() - 8) * scale + zero, want)
    linear = WeightOnlyLinear(t, device="cpu")
    assert linear.kinds == [("int4", group)]
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    exact = x @ want.t()
    got = linear(x.bfloat16()).float()
    assert float((got - exact).norm()) < 0.01 * float(exact.norm())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_other_types_become_int8_rows_within_half_a_step(qtype: GGMLQuantizationType) -> None:
    """Each weight moves by at most half of its row's step (max|w| / 127, in bfloat16); the product
    stays within 1.5% of float's (measured 0.5–0.8%)."""
    t, want = _blocks(int(qtype), 64, 512)
    linear = WeightOnlyLinear(t, device="cpu")
    assert linear.kinds == [("int8", 0)]
    step = linear.s0.float()[:, None]
    assert bool(((linear.w0.float() * step - want).abs() <= step * 0.5 * (1 + 2**-7)).all())
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    exact = x @ want.t()
    got = linear(x.bfloat16()).float()
    assert float((got - exact).norm()) < 0.015 * float(exact.norm())


def test_a_mixed_type_gguf_on_weight_only_kernels_computes_close_to_its_dequantized_load(
    tmp_path: Path,
) -> None:
    """The whole conversion a GPU load runs (after the blocks are mapped and merged), here on CPU:
    every quantized projection becomes a WeightOnlyLinear (merged q/k/v of three types keep a
    kernel each), the quantized embedding a dense table; logits within 3% of the dequantized load's
    (measured 0.9%)."""
    _, tensors = quant_mix_tensors()
    path = write_gguf(tmp_path / "mix.gguf", QUANT_MIX_SPEC, tensors)
    ids = torch.tensor([1, 5, 9, 200, 511])
    model = load_model(path, dtype="bfloat16", progress=False)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert use_weight_only_kernels(model, "cpu") == quantized > 0
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    qkv = model.decoder.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, WeightOnlyLinear) and [k for k, _ in qkv.kinds] == ["int4", "int8", "int8"]
    dense = load_model(path, dtype="bfloat16", progress=False, quantized=False)
    got, want = (_forward(m, ids) for m in (model, dense))
    assert float((got - want).norm()) < 0.03 * float(want.norm())
