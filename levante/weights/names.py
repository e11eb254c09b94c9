"""Tensor names in each file format → the model's parameter names (the one internal naming).
Tables of full-match patterns, so a name that fits none is reported instead of guessed."""

from __future__ import annotations

import re

from levante.config import Layout

EMBED = "decoder.embed_tokens.weight"
LM_HEAD = "decoder.lm_head.weight"

_Rules = tuple[tuple[re.Pattern[str], str], ...]


def _rules(*pairs: tuple[str, str]) -> _Rules:
    """Every `.` in a pattern is a literal dot (wildcards are written `\\S+`, `\\d+`)."""
    return tuple((re.compile(pattern.replace(".", r"\.")), template) for pattern, template in pairs)


_L = r"layers.(\d+)"
_VL = rf"vision_encoder.transformer.{_L}"
_VI = r"vision.layers.\1"

# HF: Mistral3 saves with `language_model.model.*` (transformers < 4.52) or `model.language_model.*`;
# MistralForCausalLM/LlamaForCausalLM with `model.*`. Vision and projector rules come first because
# `model.(\S+)` would also match `model.vision_tower.*`.
_HF = _rules(
    (r"(?:model.)?vision_tower.transformer.(\S+)", r"vision.\1"),
    (r"(?:model.)?vision_tower.(\S+)", r"vision.\1"),
    (r"(?:model.)?multi_modal_projector.(\S+)", r"projector.\1"),
    (r"(?:language_model.)?lm_head.weight", "decoder.lm_head.weight"),
    (r"(?:language_model.model|model.language_model|model).(\S+)", r"decoder.\1"),
)

_MISTRAL = _rules(
    ("tok_embeddings.weight", "decoder.embed_tokens.weight"),
    ("norm.weight", "decoder.norm.weight"),
    ("output.weight", "decoder.lm_head.weight"),
    (rf"{_L}.attention_norm.weight", r"decoder.layers.\1.input_layernorm.weight"),
    (rf"{_L}.ffn_norm.weight", r"decoder.layers.\1.post_attention_layernorm.weight"),
    (rf"{_L}.attention.w([qkvo]).weight", r"decoder.layers.\1.self_attn.\2_proj.weight"),
    (rf"{_L}.feed_forward.w1.weight", r"decoder.layers.\1.mlp.gate_proj.weight"),
    (rf"{_L}.feed_forward.w2.weight", r"decoder.layers.\1.mlp.down_proj.weight"),
    (rf"{_L}.feed_forward.w3.weight", r"decoder.layers.\1.mlp.up_proj.weight"),
    (r"vision_encoder.(patch_conv|ln_pre).weight", r"vision.\1.weight"),
    (rf"{_VL}.(attention_norm|ffn_norm).weight", rf"{_VI}.\2.weight"),
    (rf"{_VL}.attention.w([qkvo]).weight", rf"{_VI}.attention.\2_proj.weight"),
    (rf"{_VL}.feed_forward.w1.weight", rf"{_VI}.feed_forward.gate_proj.weight"),
    (rf"{_VL}.feed_forward.w2.weight", rf"{_VI}.feed_forward.down_proj.weight"),
    (rf"{_VL}.feed_forward.w3.weight", rf"{_VI}.feed_forward.up_proj.weight"),
    ("pre_mm_projector_norm.weight", "projector.norm.weight"),
    ("patch_merger.merging_layer.weight", "projector.patch_merger.merging_layer.weight"),
    (r"vision_language_adapter.w_in.(weight|bias)", r"projector.linear_1.\1"),
    (r"vision_language_adapter.w_out.(weight|bias)", r"projector.linear_2.\1"),
)

# llama.cpp's names for the llama architecture (which it also uses for Mistral text models).
_GGUF = _rules(
    ("token_embd.weight", "decoder.embed_tokens.weight"),
    ("output_norm.weight", "decoder.norm.weight"),
    ("output.weight", "decoder.lm_head.weight"),
    (r"blk.(\d+).attn_norm.weight", r"decoder.layers.\1.input_layernorm.weight"),
    (r"blk.(\d+).ffn_norm.weight", r"decoder.layers.\1.post_attention_layernorm.weight"),
    (r"blk.(\d+).attn_([qkv]).weight", r"decoder.layers.\1.self_attn.\2_proj.weight"),
    (r"blk.(\d+).attn_output.weight", r"decoder.layers.\1.self_attn.o_proj.weight"),
    (r"blk.(\d+).ffn_(gate|up|down).weight", r"decoder.layers.\1.mlp.\2_proj.weight"),
    # llama.cpp's mmproj file for Pixtral (`--mmproj`)
    ("v.patch_embd.weight", "vision.patch_conv.weight"),
    ("v.pre_ln.weight", "vision.ln_pre.weight"),
    (r"v.blk.(\d+).attn_([qkv]).weight", r"vision.layers.\1.attention.\2_proj.weight"),
    (r"v.blk.(\d+).attn_out.weight", r"vision.layers.\1.attention.o_proj.weight"),
    (r"v.blk.(\d+).ln1.weight", r"vision.layers.\1.attention_norm.weight"),
    (r"v.blk.(\d+).ln2.weight", r"vision.layers.\1.ffn_norm.weight"),
    (r"v.blk.(\d+).ffn_(gate|up|down).weight", r"vision.layers.\1.feed_forward.\2_proj.weight"),
    ("mm.input_norm.weight", "projector.norm.weight"),
    ("mm.patch_merger.weight", "projector.patch_merger.merging_layer.weight"),
    (r"mm.([12]).(weight|bias)", r"projector.linear_\1.\2"),
)

_TABLES: dict[Layout, _Rules] = {"hf": _HF, "mistral": _MISTRAL, "gguf": _GGUF}


def internal_name(layout: Layout, name: str) -> str | None:
    """The model parameter a tensor of this file format feeds, or None when no rule knows it."""
    for pattern, template in _TABLES[layout]:
        if m := pattern.fullmatch(name):
            return m.expand(template)
    return None
