"""The whole model: a text decoder, plus (for Mistral3) the vision encoder and projector whose
outputs replace the embeddings of the `[IMG]` placeholder tokens."""

from __future__ import annotations

import torch
from torch import nn

from levante.config import ModelConfig
from levante.model.attention import AttentionBackend
from levante.model.decoder import Decoder, SelfAttention
from levante.model.layers import GatedMLP
from levante.model.vision import Projector, VisionEncoder


class Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config.text)
        if config.text.tie_word_embeddings:
            self.decoder.tie_weights()
        self.vision = VisionEncoder(config.vision) if config.vision else None
        self.projector = Projector(config) if config.vision else None

    def prepare(self) -> None:
        """Readies a loaded model for inference: merges the projections that checkpoints store
        apart (the forward runs them merged) and tabulates the rotary cos/sin. Which kernel runs the
        projections is the engine's choice."""
        for module in [m for m in self.modules() if isinstance(m, (SelfAttention, GatedMLP))]:
            module.merge()
        self.decoder.cache_rope()

    def encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """One [n_image_tokens, text_hidden] tensor per (C, H, W) image, in the order their
        `[IMG]` tokens appear in the prompt."""
        if self.vision is None or self.projector is None:
            raise ValueError("this model has no vision encoder")
        if not images:
            return []
        feats, grids = self.vision(images)
        merged = self.projector(feats, grids)
        m = self.config.spatial_merge_size
        return list(merged.split([(h // m) * (w // m) for h, w in grids]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] — the tokens of several sequences, concatenated, no padding.
        image_embeds: one row per `[IMG]` token in `input_ids`, in order. Returns hidden [T, d]."""
        embeds = self.decoder.embed_tokens(input_ids)
        if image_embeds is not None:
            slots = input_ids == self.config.image_token_id
            n = int(slots.sum())
            if n != image_embeds.shape[0]:
                raise ValueError(
                    f"{n} image tokens in the batch but {image_embeds.shape[0]} image embeddings"
                )
            embeds = embeds.masked_scatter(slots[:, None], image_embeds.to(embeds.dtype))
        return self.decoder(embeds, positions, attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given hidden rows."""
        return self.decoder.logits(hidden)
