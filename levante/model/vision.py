"""Pixtral vision encoder and the Mistral3 projector that turns its patches into text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from levante.config import ModelConfig, VisionConfig
from levante.model.layers import GatedMLP, RMSNorm, activation, apply_rope, rope_cos_sin, rope_inv_freq


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """Bidirectional attention inside each image only (block-diagonal over `lengths`)."""
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin).transpose(0, 1)
        k = apply_rope(self.k_proj(x).view(t, self.num_heads, self.head_dim), cos, sin).transpose(0, 1)
        v = self.v_proj(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(qi, ki, vi)
                for qi, ki, vi in zip(
                    q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True
                )
            ],
            dim=1,
        )
        return self.o_proj(out.transpose(0, 1).reshape(t, -1))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionEncoder(nn.Module):
    """Pixtral: per-image patch conv → concatenated patches → ln_pre → blocks with 2-D RoPE."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.ln_pre = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def rope_angles(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Angles [N, head_dim/2]: rows rotate with the even frequencies, columns with the odd."""
        freqs = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
        out = []
        for h, w in grids:
            rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
            cols = torch.arange(w, dtype=torch.float32).repeat(h)
            out.append(
                torch.cat((rows[:, None] * freqs[None, ::2], cols[:, None] * freqs[None, 1::2]), dim=-1)
            )
        return torch.cat(out)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: (C, H, W) each, H and W multiples of the patch size. Returns the final hidden
        states of all patches [N, hidden] and each image's patch grid (rows, cols)."""
        dtype = self.patch_conv.weight.dtype
        patches = [self.patch_conv(img.to(dtype)[None])[0] for img in images]
        grids = [(p.shape[1], p.shape[2]) for p in patches]
        x = self.ln_pre(torch.cat([p.flatten(1).T for p in patches]))
        cos, sin = rope_cos_sin(self.rope_angles(grids).to(x.device), x.dtype)
        lengths = [h * w for h, w in grids]
        for layer in self.layers:
            x = layer(x, cos, sin, lengths)
        return x, grids


class PatchMerger(nn.Module):
    """Concatenates each 2×2 block of neighbouring patches (per image) and projects it back."""

    def __init__(self, dim: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        d, m = x.shape[-1], self.merge
        blocks = []
        for feats, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
            grid = feats.view(h, w, d).permute(2, 0, 1)[None]
            blocks.append(F.unfold(grid, kernel_size=m, stride=m).view(d * m * m, -1).T)
        return self.merging_layer(torch.cat(blocks))


class Projector(nn.Module):
    """RMSNorm → patch merger → Linear-GELU-Linear into the text embedding space."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vision is not None
        vd, td = cfg.vision.hidden_size, cfg.text.hidden_size
        self.norm = RMSNorm(vd, cfg.text.rms_norm_eps)
        self.patch_merger = PatchMerger(vd, cfg.spatial_merge_size)
        self.linear_1 = nn.Linear(vd, td, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = nn.Linear(td, td, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))
