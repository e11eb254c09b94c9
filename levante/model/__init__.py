"""Pure nn.Modules: the Mistral/Llama decoder, Pixtral vision, the projector, and Mistral3."""

from levante.config import ModelConfig
from levante.model.attention import AttentionBackend, causal_attention
from levante.model.multimodal import Model


def build_model(config: ModelConfig) -> Model:
    """Builds the module tree; call under `torch.device("meta")`, let the weight loader
    materialize each tensor (so peak memory stays at the model's size), then `Model.prepare` it."""
    return Model(config)


__all__ = ["AttentionBackend", "Model", "build_model", "causal_attention"]
