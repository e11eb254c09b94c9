"""A synthetic `tekken.json` for tests: NOT Mistral's released file. It reuses the BPE vocabulary
that mistral-common bundles (`tekken_240911.json`, the same merges Mistral Small 3.2 ships) and
adds Mistral Small 3.2's special-token table, version v11 and its image block, so prompts encode
exactly as they would with the real tokenizer without downloading anything."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

NUM_SPECIAL = 1000
VOCAB_SIZE = 131072

# Named special tokens of Mistral Small 3.2 by id; every other id below NUM_SPECIAL is a filler.
_NAMED_SPECIAL = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    32: "[ARGS]",
    33: "[CALL_ID]",
}


def _special_tokens() -> list[dict[str, Any]]:
    """The full table is written out: mistral-common only appends fillers after the listed
    tokens, so a gap (ids 20–31) must be filled explicitly to keep rank == position."""
    return [
        {"rank": i, "token_str": _NAMED_SPECIAL.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL)
    ]


def write_tekken(directory: Path | str) -> Path:
    """Write the synthetic `tekken.json` into `directory` (created if needed); returns its path."""
    base = json.loads((files("mistral_common") / "data" / "tekken_240911.json").read_text(encoding="utf-8"))
    data = {
        "config": {
            **base["config"],
            "version": "v11",
            "default_vocab_size": VOCAB_SIZE,
            "default_num_special_tokens": NUM_SPECIAL,
        },
        "vocab": base["vocab"],
        "special_tokens": _special_tokens(),
        "image": {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2},
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
