"""Load-time transforms of the model's Linear layers must not change what they compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from levante.model.layers import PackedLinear, merge_linears, pack_linears


def test_merged_projections_equal_the_separate_ones() -> None:
    torch.manual_seed(0)
    parts = [nn.Linear(48, n, bias=False) for n in (64, 16, 16)]
    x = torch.randn(5, 48)
    merged = merge_linears(*parts)(x)
    torch.testing.assert_close(merged, torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_packed_bfloat16_linear_is_bit_identical(rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_pack_linears_replaces_every_bias_free_linear() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8, bias=False), nn.Sequential(nn.Linear(8, 4, bias=False)), nn.Linear(4, 2)
    )
    pack_linears(model.to(torch.bfloat16))
    assert [type(m).__name__ for m in model.modules()][1:] == [
        "PackedLinear",
        "Sequential",
        "PackedLinear",
        "Linear",
    ]
