"""Model configuration read from the checkpoint itself: HF `config.json`, Mistral-native
`params.json`, or GGUF metadata. Shapes are never hard-coded; they come from here."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from levante.errors import CheckpointError, LevanteError

Layout = Literal["hf", "mistral", "gguf"]


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    rope_theta: float
    num_channels: int
    hidden_act: str
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs to be built. `layout` says which file format it came from,
    so the weight loader knows which names and rotary convention to expect."""

    text: TextConfig
    layout: Layout
    architecture: str
    vision: VisionConfig | None = None
    image_token_id: int = 10
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_bias: bool = False


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"{where}: missing key '{key}'")
    return d[key]


def read_json(path: Path, error: type[LevanteError] = CheckpointError) -> dict[str, Any]:
    """A JSON object from a model file, or an `error` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def _rope_theta(d: dict[str, Any], where: str, plain: str = "default") -> float:
    """Plain RoPE only: newer transformers nest θ in `rope_parameters` (text: type "default",
    Pixtral: "axial"); any scaling is refused rather than silently ignored."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", plain))
    if kind not in (plain, None):
        raise CheckpointError(f"{where}: rope scaling '{kind}' is not supported")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


_TEXT_ARCHS = ("MistralForCausalLM", "LlamaForCausalLM")
_MM_ARCHS = ("Mistral3ForConditionalGeneration",)


def _hf_text(d: dict[str, Any], where: str, tie_default: bool) -> TextConfig:
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise CheckpointError(f"{where}: '{flag}: true' is not supported")
    max_positions = int(d.get("max_position_embeddings", 131072))
    if d.get("sliding_window") not in (None, 0) and d["sliding_window"] < max_positions:
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    hidden = int(_require(d, "hidden_size", where))
    heads = int(_require(d, "num_attention_heads", where))
    return TextConfig(
        hidden_size=hidden,
        num_layers=int(_require(d, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        intermediate_size=int(_require(d, "intermediate_size", where)),
        vocab_size=int(_require(d, "vocab_size", where)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(d, where),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
    )


def from_hf(path: Path) -> ModelConfig:
    d = read_json(path)
    archs = d.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch in _TEXT_ARCHS:
        return ModelConfig(text=_hf_text(d, str(path), False), layout="hf", architecture=arch)
    if arch not in _MM_ARCHS:
        raise CheckpointError(
            f"{path}: unknown architecture {arch!r} (supported: {', '.join(_TEXT_ARCHS + _MM_ARCHS)})"
        )
    text_d = _require(d, "text_config", str(path))
    vis_d = _require(d, "vision_config", str(path))
    layer = d.get("vision_feature_layer", -1)
    if layer != -1:
        raise CheckpointError(f"{path}: vision_feature_layer {layer} is not supported (only -1)")
    where = f"{path} vision_config"
    vision = VisionConfig(
        hidden_size=int(_require(vis_d, "hidden_size", where)),
        num_layers=int(_require(vis_d, "num_hidden_layers", where)),
        num_heads=int(_require(vis_d, "num_attention_heads", where)),
        intermediate_size=int(_require(vis_d, "intermediate_size", where)),
        patch_size=int(_require(vis_d, "patch_size", where)),
        image_size=int(_require(vis_d, "image_size", where)),
        rope_theta=_rope_theta(vis_d, where, plain="axial"),
        num_channels=int(vis_d.get("num_channels", 3)),
        # transformers' PixtralVisionConfig default when the key is absent
        hidden_act=str(vis_d.get("hidden_act", "gelu")),
    )
    return ModelConfig(
        text=_hf_text(text_d, f"{path} text_config", bool(d.get("tie_word_embeddings", False))),
        layout="hf",
        architecture=arch,
        vision=vision,
        image_token_id=int(d.get("image_token_index", d.get("image_token_id", 10))),
        spatial_merge_size=int(d.get("spatial_merge_size", 2)),
        projector_hidden_act=str(d.get("projector_hidden_act", "gelu")),
        projector_bias=bool(d.get("multimodal_projector_bias", False)),
    )


def from_params(path: Path) -> ModelConfig:
    """Mistral-native `params.json`, the format `consolidated.safetensors` ships with."""
    d = read_json(path)
    where = str(path)
    text = TextConfig(
        hidden_size=int(_require(d, "dim", where)),
        num_layers=int(_require(d, "n_layers", where)),
        num_heads=int(_require(d, "n_heads", where)),
        num_kv_heads=int(d.get("n_kv_heads") or d["n_heads"]),
        head_dim=int(d.get("head_dim") or d["dim"] // d["n_heads"]),
        intermediate_size=int(_require(d, "hidden_dim", where)),
        vocab_size=int(_require(d, "vocab_size", where)),
        rms_norm_eps=float(d.get("norm_eps", 1e-5)),
        rope_theta=float(d.get("rope_theta", 1e6)),
        max_position_embeddings=int(d.get("max_position_embeddings") or d.get("max_seq_len") or 131072),
        tie_word_embeddings=bool(d.get("tied_embeddings", False)),
    )
    v = d.get("vision_encoder")
    if not v:
        return ModelConfig(text=text, layout="mistral", architecture="MistralForCausalLM")
    where = f"{path} vision_encoder"
    if v.get("mm_projector_id", "patch_merge") != "patch_merge" or not v.get(
        "add_pre_mm_projector_layer_norm", True
    ):
        raise CheckpointError(f"{where}: only the patch-merge projector with its pre-norm is supported")
    vision = VisionConfig(
        hidden_size=int(_require(v, "hidden_size", where)),
        num_layers=int(_require(v, "num_hidden_layers", where)),
        num_heads=int(_require(v, "num_attention_heads", where)),
        intermediate_size=int(_require(v, "intermediate_size", where)),
        patch_size=int(_require(v, "patch_size", where)),
        image_size=int(v.get("image_size") or _require(v, "max_image_size", where)),
        rope_theta=float(v.get("rope_theta", 10000.0)),
        num_channels=int(v.get("num_channels", 3)),
        hidden_act="silu",
    )
    return ModelConfig(
        text=text,
        layout="mistral",
        architecture="Mistral3ForConditionalGeneration",
        vision=vision,
        image_token_id=int(v.get("image_token_id", 10)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        projector_bias=bool(v.get("adapter_bias", False)),
    )


def from_gguf_fields(fields: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
    """GGUF metadata (llama architecture, which llama.cpp also uses for Mistral text models).
    `fields` maps metadata keys to plain Python values."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str) -> Any:
        return _require(fields, f"llama.{key}", where)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    text = TextConfig(
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get("llama.attention.head_count_kv") or heads),
        head_dim=int(
            fields.get("llama.attention.key_length")
            or fields.get("llama.rope.dimension_count")
            or hidden // heads
        ),
        intermediate_size=int(get("feed_forward_length")),
        vocab_size=int(
            fields.get("llama.vocab_size") or len(_require(fields, "tokenizer.ggml.tokens", where))
        ),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    if fields.get("llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"{where}: rope scaling is not supported")
    return ModelConfig(text=text, layout="gguf", architecture="LlamaForCausalLM")


def with_mmproj(text: ModelConfig, fields: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
    """A GGUF text model joined with llama.cpp's mmproj file for Pixtral (Mistral Small 3.1/3.2's
    vision tower and projector, `clip.projector_type` "pixtral"); `fields` is the mmproj's metadata."""
    kind = fields.get("clip.projector_type") or fields.get("clip.vision.projector_type")
    if fields.get("general.architecture") != "clip" or kind != "pixtral":
        raise CheckpointError(
            f"{where}: not a Pixtral mmproj GGUF (architecture {fields.get('general.architecture')!r}, "
            f"projector {kind!r}; supported: clip / pixtral)"
        )

    def get(key: str) -> int:
        return int(_require(fields, f"clip.vision.{key}", where))

    theta = fields.get("clip.vision.rope.freq_base", fields.get("clip.rope.freq_base", 10000.0))
    vision = VisionConfig(
        hidden_size=get("embedding_length"),
        num_layers=get("block_count"),
        num_heads=get("attention.head_count"),
        intermediate_size=get("feed_forward_length"),
        patch_size=get("patch_size"),
        image_size=get("image_size"),
        rope_theta=float(theta),
        num_channels=3,
        hidden_act="silu" if fields.get("clip.use_silu") else "gelu",
        rms_norm_eps=float(fields.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
    )
    return replace(
        text,
        architecture="Mistral3ForConditionalGeneration",
        vision=vision,
        spatial_merge_size=int(fields.get("clip.vision.spatial_merge_size", 2)),
        projector_bias="mm.1.bias" in tensor_names,
    )
