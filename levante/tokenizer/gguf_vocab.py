"""A tokenizer rebuilt from GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys), for GGUF files
that come without `tokenizer.json`. Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`), the
kind Llama-family and SmolLM GGUFs carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from levante.errors import TokenizerError
from levante.tokenizer.hf import HFBackend
from levante.weights.gguf_file import read_gguf

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` → the regex splits applied in order before byte-level BPE (llama.cpp's
# table). SmolLM/StarCoder isolate every digit first, then split like GPT-2.
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "tekken": (_TEKKEN,),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# The special-token variables chat templates read, and where GGUF keeps their ids.
_SPECIAL_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# Ids that end a turn: EOS plus the end-of-turn/end-of-message tokens some instruct models declare.
_STOP_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    try:
        return read_gguf(path).metadata
    except (OSError, ValueError, IndexError, KeyError) as e:  # truncated files fail as Index/KeyError
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None


def _pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
    if pre not in PRE_SPLITS:
        raise TokenizerError(
            f"{where}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_SPLITS)})"
        )
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_SPLITS[pre]
    ]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def load_gguf(path: Path) -> HFBackend:
    """Byte-level BPE from `tokenizer.ggml.tokens`/`merges`; CONTROL tokens become special tokens and
    USER_DEFINED ones plain added tokens, so both are matched whole in text as llama.cpp does."""
    meta = read_metadata(path)
    where = str(path)

    def get(key: str) -> Any:
        if f"tokenizer.ggml.{key}" not in meta:
            raise TokenizerError(f"{where}: GGUF metadata has no tokenizer.ggml.{key}")
        return meta[f"tokenizer.ggml.{key}"]

    if get("model") != "gpt2":
        raise TokenizerError(f"{where}: GGUF tokenizer model {get('model')!r} is not supported (only 'gpt2')")
    tokens: list[str] = get("tokens")
    merges = [tuple(m.split(" ", 1)) for m in get("merges")]
    tok = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(get("pre"), where)
    tok.decoder = decoders.ByteLevel()
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    tok.add_tokens(
        [
            AddedToken(t, special=kind == _CONTROL, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_KEYS.items()}
    template = meta.get("tokenizer.chat_template")
    return HFBackend(
        tok,
        templates={"default": template} if template else {},
        special_tokens={name: tokens[i] for name, i in ids.items() if i is not None},
        eos_token_ids=[meta[f"tokenizer.ggml.{k}"] for k in _STOP_KEYS if f"tokenizer.ggml.{k}" in meta],
        adds_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),  # llama.cpp's default for BPE
        where=where,
    )
