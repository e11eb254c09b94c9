"""The Mistral/Llama text decoder over a flat batch of tokens from several sequences."""

from __future__ import annotations

import torch
from torch import nn

from levante.config import TextConfig
from levante.model.attention import AttentionBackend
from levante.model.layers import GatedMLP, RMSNorm, apply_rope, merge_linears, rope_cos_sin, rope_inv_freq


class SelfAttention(nn.Module):
    """Checkpoints store q, k and v apart, so they are loaded apart; `merge` then fuses them into
    `qkv_proj`, which the forward uses (one matmul, and one rotary pass over q and k together)."""

    qkv_proj: nn.Module

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def merge(self) -> None:
        self.qkv_proj = merge_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        t, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :heads], cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, heads:]
        return self.o_proj(attn(self.layer, q, k, v).reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu")

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings → pre-norm blocks → final norm; `logits` applies the LM head separately so a
    caller can pick only the rows it samples from."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: torch.Tensor  # see cache_rope

    def cache_rope(self) -> None:
        """cos and sin of every position, once, in the model's dtype and on its device: a step looks
        its tokens' rows up (as vLLM's rotary cache) instead of computing a cos and a sin per element,
        which a compiled step would repeat in every layer (Inductor recomputes cheap elementwise
        inputs in each consumer). 64 MB for Mistral Small 3.2's 128K positions in bfloat16."""
        weight = self.norm.weight
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(weight.device)
        positions = torch.arange(self.cfg.max_position_embeddings, device=weight.device)
        cos, sin = rope_cos_sin(positions.float()[:, None] * inv_freq[None, :], weight.dtype)
        self.register_buffer("rope", torch.stack([cos, sin]), persistent=False)  # [2, positions, 1, D]

    def tie_weights(self) -> None:
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """embeds: [T, hidden]; positions: [T] (each token's index in its own sequence)."""
        cos, sin = self.rope[:, positions]
        h = embeds
        for layer in self.layers:
            h = layer(h, cos, sin, attn)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
