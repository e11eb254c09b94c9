"""Checkpoints in three formats — HF safetensors (both key prefixes, sharded or not),
Mistral-native `consolidated.safetensors`, and llama.cpp GGUF — read tensor by tensor into the
model's own parameter names."""

from levante.weights.checkpoint import Checkpoint, TensorEntry, open_checkpoint
from levante.weights.loader import load_weights

__all__ = ["Checkpoint", "TensorEntry", "load_weights", "open_checkpoint"]
