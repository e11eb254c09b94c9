"""Tiny random SYNTHETIC checkpoints — not any released model — written in the real file formats
from one set of weights: HF safetensors (`config.json`, either key prefix, optionally sharded),
Mistral-native (`params.json` + `consolidated.safetensors`) and a llama.cpp GGUF. Readers can so
be checked against each other and against transformers without downloading anything.

Weights are keyed by the model's own parameter names, in HF (rotate-half) row order; each writer
renames them and, where its format wants interleaved RoPE rows, permutes q/k the way Mistral's
and llama.cpp's converters do. The names written here follow the format documentation directly
rather than inverting `levante.weights.names`, so a mistake there cannot cancel out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import save_file

from levante.config import ModelConfig, TextConfig, VisionConfig
from levante.model import build_model
from levante.weights.rotary import rotary_heads, to_interleaved

Weights = dict[str, torch.Tensor]
GGUFTensors = dict[str, tuple[np.ndarray, GGMLQuantizationType]]


@dataclass(frozen=True)
class TinySpec:
    """Shapes of a tiny Mistral Small 3.2 look-alike: head_dim ≠ hidden/heads and the real
    Tekken vocabulary size, as in the real model. `vision=False` gives a text-only model."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 128
    vocab_size: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e9
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    vision: bool = True
    vision_hidden_size: int = 64
    vision_num_layers: int = 2
    vision_num_heads: int = 4
    vision_intermediate_size: int = 128
    patch_size: int = 14
    image_size: int = 1540
    vision_rope_theta: float = 1e4
    image_token_index: int = 10
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_bias: bool = False
    dtype: torch.dtype = torch.bfloat16

    def model_config(self) -> ModelConfig:
        """What a reader should find in any of the written files (layout aside)."""
        text = TextConfig(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if not self.vision:
            return ModelConfig(text=text, layout="hf", architecture="MistralForCausalLM")
        vision = VisionConfig(
            hidden_size=self.vision_hidden_size,
            num_layers=self.vision_num_layers,
            num_heads=self.vision_num_heads,
            intermediate_size=self.vision_intermediate_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
            rope_theta=self.vision_rope_theta,
            num_channels=3,
            hidden_act="silu",
        )
        return ModelConfig(
            text=text,
            layout="hf",
            architecture="Mistral3ForConditionalGeneration",
            vision=vision,
            image_token_id=self.image_token_index,
            spatial_merge_size=self.spatial_merge_size,
            projector_hidden_act=self.projector_hidden_act,
            projector_bias=self.projector_bias,
        )


def _shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, read off the model itself built on the meta device."""
    with torch.device("meta"):
        model = build_model(spec.model_config())
    tied = {"decoder.lm_head.weight"} if spec.tie_word_embeddings else set()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def random_weights(spec: TinySpec, seed: int = 0) -> Weights:
    """Random weights that keep activations at unit scale (matrices ~ N(0, 1/fan_in), norms
    ~ 1 + N(0, 0.1²)), so logits are far apart: std 0.02 would leave them all near zero and let a
    wrong model pass a parity test."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in _shapes(spec).items():
        x = torch.randn(shape, generator=gen)
        if len(shape) > 1:
            x /= float(np.prod(shape[1:])) ** 0.5
        elif name.endswith("norm.weight"):
            x = 1 + 0.1 * x
        else:
            x *= 0.1
        weights[name] = x.to(spec.dtype)
    return weights


def _save(tensors: Weights, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _hf_name(name: str, multimodal: bool, new_prefix: bool) -> str:
    part, _, rest = name.partition(".")
    root = "model." if new_prefix else ""
    if name == "decoder.lm_head.weight":
        return "lm_head.weight" if new_prefix or not multimodal else "language_model.lm_head.weight"
    if part == "decoder" and not multimodal:
        return f"model.{rest}"
    if part == "decoder":
        return f"model.language_model.{rest}" if new_prefix else f"language_model.model.{rest}"
    if part == "vision":
        return root + "vision_tower." + ("transformer." if rest.startswith("layers.") else "") + rest
    return f"{root}multi_modal_projector.{rest}"


def hf_config(spec: TinySpec) -> dict[str, Any]:
    """A config.json that transformers' MistralForCausalLM / Mistral3ForConditionalGeneration loads."""
    text = {
        "model_type": "mistral",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "silu",
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "sliding_window": None,
        "tie_word_embeddings": spec.tie_word_embeddings,
    }
    dtype = str(spec.dtype).removeprefix("torch.")
    if not spec.vision:
        return {"architectures": ["MistralForCausalLM"], **text, "torch_dtype": dtype}
    vision = {
        "model_type": "pixtral",
        "hidden_size": spec.vision_hidden_size,
        "num_hidden_layers": spec.vision_num_layers,
        "num_attention_heads": spec.vision_num_heads,
        "head_dim": spec.vision_hidden_size // spec.vision_num_heads,
        "intermediate_size": spec.vision_intermediate_size,
        "hidden_act": "silu",
        "patch_size": spec.patch_size,
        "image_size": spec.image_size,
        "num_channels": 3,
        "rope_theta": spec.vision_rope_theta,
    }
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": spec.image_token_index,
        "spatial_merge_size": spec.spatial_merge_size,
        "projector_hidden_act": spec.projector_hidden_act,
        "multimodal_projector_bias": spec.projector_bias,
        "vision_feature_layer": -1,
        # transformers 5 ties on the top-level flag, whose Mistral3 default is true
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": dtype,
    }


def write_hf(
    directory: Path, weights: Weights, spec: TinySpec, prefix: Literal["old", "new"] = "new", shards: int = 1
) -> Path:
    """HF layout. `prefix` (Mistral3 only): "old" = `language_model.model.*` (transformers
    < 4.52), "new" = `model.language_model.*`. `shards` > 1 splits the tensors over
    `model-0000i-of-0000n.safetensors` files listed in `model.safetensors.index.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    tensors = {_hf_name(k, spec.vision, prefix == "new"): v for k, v in weights.items()}
    if shards == 1:
        _save(tensors, directory / "model.safetensors")
        return directory
    names = list(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        _save({names[j]: tensors[names[j]] for j in chunk}, directory / file)
        weight_map |= {names[j]: file for j in chunk}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


_MISTRAL_FIXED = {
    "decoder.embed_tokens.weight": "tok_embeddings.weight",
    "decoder.norm.weight": "norm.weight",
    "decoder.lm_head.weight": "output.weight",
    "vision.patch_conv.weight": "vision_encoder.patch_conv.weight",
    "vision.ln_pre.weight": "vision_encoder.ln_pre.weight",
    "projector.norm.weight": "pre_mm_projector_norm.weight",
    "projector.patch_merger.merging_layer.weight": "patch_merger.merging_layer.weight",
}
# Applied in order to the rest of a layer's name.
_MISTRAL_PARTS = (
    ("post_attention_layernorm", "ffn_norm"),
    ("input_layernorm", "attention_norm"),
    ("self_attn.", "attention."),
    ("mlp.", "feed_forward."),
    ("q_proj", "wq"),
    ("k_proj", "wk"),
    ("v_proj", "wv"),
    ("o_proj", "wo"),
    ("gate_proj", "w1"),
    ("down_proj", "w2"),
    ("up_proj", "w3"),
    ("linear_1", "vision_language_adapter.w_in"),
    ("linear_2", "vision_language_adapter.w_out"),
)


def _mistral_name(name: str) -> str:
    if name in _MISTRAL_FIXED:
        return _MISTRAL_FIXED[name]
    part, _, rest = name.partition(".")
    for old, new in _MISTRAL_PARTS:
        rest = rest.replace(old, new)
    return f"vision_encoder.transformer.{rest}" if part == "vision" else rest


def write_mistral(directory: Path, weights: Weights, spec: TinySpec) -> Path:
    """Mistral-native layout: params.json (with a `vision_encoder` block) and
    consolidated.safetensors, q/k rows (text and vision) in interleaved order."""
    directory.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {
        "dim": spec.hidden_size,
        "n_layers": spec.num_layers,
        "head_dim": spec.head_dim,
        "hidden_dim": spec.intermediate_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "rope_theta": spec.rope_theta,
        "norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "max_seq_len": spec.max_position_embeddings,
        "tied_embeddings": spec.tie_word_embeddings,
    }
    if spec.vision:
        params["vision_encoder"] = {
            "hidden_size": spec.vision_hidden_size,
            "num_channels": 3,
            "max_image_size": spec.image_size,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "rope_theta": spec.vision_rope_theta,
            "intermediate_size": spec.vision_intermediate_size,
            "num_hidden_layers": spec.vision_num_layers,
            "num_attention_heads": spec.vision_num_heads,
            "adapter_bias": spec.projector_bias,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": spec.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": True,
            "image_token_id": spec.image_token_index,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
        }
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    config = spec.model_config()
    tensors = {}
    for name, w in weights.items():
        heads = rotary_heads(name, config)
        tensors[_mistral_name(name)] = to_interleaved(w, heads) if heads else w
    _save(tensors, directory / "consolidated.safetensors")
    return directory


_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_FIXED = {
    "decoder.embed_tokens.weight": "token_embd.weight",
    "decoder.norm.weight": "output_norm.weight",
    "decoder.lm_head.weight": "output.weight",
}


def gguf_tensors(
    weights: Weights, spec: TinySpec, matrix_type: GGMLQuantizationType = GGMLQuantizationType.F32
) -> GGUFTensors:
    """The text decoder's tensors as llama.cpp's converter stores them: GGUF names, q/k rows
    interleaved, norms in F32 and matrices in `matrix_type` (any type gguf can quantize to).
    Vision weights are left out: llama.cpp keeps them in a separate mmproj file."""
    return _llama_cpp_tensors(weights, spec, matrix_type, ("decoder.",), _GGUF_FIXED, "blk", _GGUF_LAYER)


def _llama_cpp_tensors(
    weights: Weights,
    spec: TinySpec,
    matrix_type: GGMLQuantizationType,
    prefixes: tuple[str, ...],
    fixed: dict[str, str],
    block: str,
    layer_names: dict[str, str],
) -> GGUFTensors:
    """The weights under `prefixes` renamed as llama.cpp does (`fixed` names, else
    `{block}.{i}.{layer_names[module]}.weight`), q/k rows interleaved, matrices in `matrix_type`
    and everything else (norms, the patch convolution) in F32."""
    config = spec.model_config()
    out: GGUFTensors = {}
    for name, w in weights.items():
        if not name.startswith(prefixes):
            continue
        if name in fixed:
            gguf_name = fixed[name]
        else:
            _, _, layer, module = name.removesuffix(".weight").split(".", 3)
            gguf_name = f"{block}.{layer}.{layer_names[module]}.weight"
        heads = rotary_heads(name, config)
        values = (to_interleaved(w, heads) if heads else w).float().numpy()
        qtype = matrix_type if values.ndim == 2 else GGMLQuantizationType.F32
        out[gguf_name] = (quantize(values, qtype), qtype)
    return out


def write_gguf(path: Path, spec: TinySpec, tensors: GGUFTensors) -> Path:
    """A llama-architecture GGUF file with the metadata llama.cpp writes for Mistral models."""
    writer = GGUFWriter(path, "llama")
    writer.add_name("levante synthetic tiny model")
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    return _write(writer, tensors, path)


def _write(writer: GGUFWriter, tensors: GGUFTensors, path: Path) -> Path:
    """The tensors after the metadata already added, and the file closed."""
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# llama.cpp's mmproj names for the vision tower and projector (its converter's Pixtral mapping)
_MMPROJ_FIXED = {
    "vision.patch_conv.weight": "v.patch_embd.weight",
    "vision.ln_pre.weight": "v.pre_ln.weight",
    "projector.norm.weight": "mm.input_norm.weight",
    "projector.patch_merger.merging_layer.weight": "mm.patch_merger.weight",
    "projector.linear_1.weight": "mm.1.weight",
    "projector.linear_2.weight": "mm.2.weight",
    "projector.linear_1.bias": "mm.1.bias",
    "projector.linear_2.bias": "mm.2.bias",
}
_MMPROJ_LAYER = {
    "attention_norm": "ln1",
    "ffn_norm": "ln2",
    "attention.q_proj": "attn_q",
    "attention.k_proj": "attn_k",
    "attention.v_proj": "attn_v",
    "attention.o_proj": "attn_out",
    "feed_forward.gate_proj": "ffn_gate",
    "feed_forward.up_proj": "ffn_up",
    "feed_forward.down_proj": "ffn_down",
}


def write_mmproj(
    path: Path,
    weights: Weights,
    spec: TinySpec,
    matrix_type: GGMLQuantizationType = GGMLQuantizationType.F16,
    img_break: torch.Tensor | None = None,
) -> Path:
    """llama.cpp's mmproj GGUF for a Pixtral vision tower (what its converter writes for Mistral
    Small 3.1/3.2): `clip` metadata, `v.*`/`mm.*` names, q/k rows interleaved, matrices in
    `matrix_type`, norms and the patch convolution F32, and a copy of the [IMG_BREAK] embedding."""
    writer = GGUFWriter(path, "clip")
    writer.add_string("clip.projector_type", "pixtral")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_silu", True)
    for key, value in {
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "embedding_length": spec.vision_hidden_size,
        "feed_forward_length": spec.vision_intermediate_size,
        "projection_dim": spec.hidden_size,
        "block_count": spec.vision_num_layers,
        "attention.head_count": spec.vision_num_heads,
        "spatial_merge_size": spec.spatial_merge_size,
    }.items():
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_float32("clip.vision.rope.freq_base", spec.vision_rope_theta)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    vision = ("vision.", "projector.")
    tensors = _llama_cpp_tensors(weights, spec, matrix_type, vision, _MMPROJ_FIXED, "v.blk", _MMPROJ_LAYER)
    if img_break is not None:
        tensors["v.token_embd.img_break"] = (img_break.float().numpy(), GGMLQuantizationType.F32)
    return _write(writer, tensors, path)


# Byte offsets of each block's float16 scale fields (ggml's block layouts); filled with sane
# values so random blocks dequantize to finite numbers.
_SCALES = {
    GGMLQuantizationType.Q4_0: (0,),
    GGMLQuantizationType.Q4_1: (0, 2),
    GGMLQuantizationType.Q8_0: (0,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}


def random_blocks(
    qtype: GGMLQuantizationType, shape: tuple[int, int], rng: np.random.Generator, scale: float = 1e-2
) -> np.ndarray:
    """Valid random GGUF blocks of `qtype` for a [rows, cols] weight, written directly (gguf cannot
    quantize to the K types): random codes, float16 scales in [scale / 10, scale]."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _SCALES[qtype]:
        scales = rng.uniform(scale / 10, scale, raw.shape[:2]).astype(np.float16)
        raw[..., offset : offset + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


# Text-only and wide enough for the K types' 256-weight blocks.
QUANT_MIX_SPEC = TinySpec(
    hidden_size=256, num_layers=1, head_dim=64, intermediate_size=256, vocab_size=512, vision=False
)


def quant_mix_tensors(seed: int = 2) -> tuple[Weights, GGUFTensors]:
    """A GGUF of `QUANT_MIX_SPEC` holding every type the loader reads, one matrix each: q/k/v in
    three different types (as llama.cpp's Q4_K_M recipe mixes them), gate and up apart, down in
    BF16, the head in F32. Returns the float weights it started from (those of the F16/BF16/F32
    tensors; the quantized ones are random blocks) and the tensors."""
    q = GGMLQuantizationType
    w = random_weights(QUANT_MIX_SPEC, seed=seed)
    tensors = gguf_tensors(w, QUANT_MIX_SPEC, matrix_type=q.F16)
    rng = np.random.default_rng(0)
    for name, qtype in {
        "blk.0.attn_q.weight": q.Q4_K,
        "blk.0.attn_k.weight": q.Q5_K,
        "blk.0.attn_v.weight": q.Q6_K,
        "blk.0.attn_output.weight": q.Q4_0,
        "blk.0.ffn_gate.weight": q.Q4_1,
        "blk.0.ffn_up.weight": q.Q8_0,
    }.items():
        rows, cols = tensors[name][0].shape  # F16 values so far
        tensors[name] = (random_blocks(qtype, (rows, cols), rng), qtype)
    down = tensors["blk.0.ffn_down.weight"][0].astype(np.float32)
    tensors["blk.0.ffn_down.weight"] = (quantize(down, q.BF16), q.BF16)
    tensors["output.weight"] = (tensors["output.weight"][0].astype(np.float32), q.F32)
    return w, tensors
