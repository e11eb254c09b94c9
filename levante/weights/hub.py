"""Models named as people name them: a local path, a Hugging Face Hub repo id
(`mistralai/Mistral-Small-3.2-24B-Instruct-2506`), or a GGUF repo with a quant tag as llama.cpp's
`-hf` takes it (`org/Model-GGUF:Q4_K_M`). Hub files go through `huggingface_hub` and its cache, so
its progress bars, `HF_TOKEN`, `HF_HUB_CACHE` and offline mode (`HF_HUB_OFFLINE=1`) all apply."""

from __future__ import annotations

import re
from pathlib import Path

from levante.errors import CheckpointError

_REPO = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<tag>[\w.-]+))?$")
_SMALL = ["*.json", "*.txt", "*.jinja"]  # configs, tokenizer files, SYSTEM_PROMPT.txt


def resolve(model: str, revision: str | None = None) -> Path:
    """The local path `model` names: itself when it exists on disk, else the Hub snapshot (or the
    GGUF file) it names, fetched into or found in the Hugging Face cache. Only the weight set the
    loader would read is fetched: Mistral-native when the repo has `params.json`, else the HF
    shards (the real repo holds both, 48 GB each)."""
    path = Path(model).expanduser()
    match = _REPO.match(model)
    if path.exists() or match is None:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo, tag = match["repo"], match["tag"]

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        except GatedRepoError:
            raise CheckpointError(
                f"{repo} is gated: accept its terms on huggingface.co and set HF_TOKEN"
            ) from None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{repo}: no such repository on the Hub (or it is private: set HF_TOKEN)"
            ) from None
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache and the Hub "
                "cannot be reached (offline: HF_HUB_OFFLINE is set, or no network); download it once "
                f"with `hf download {repo}`"
            ) from None
        except HfHubHTTPError as e:
            raise CheckpointError(f"{repo}: the Hub refused the download ({e})") from None

    if tag is not None:
        snapshot = fetch([f"*{tag}*.gguf", f"*{tag.lower()}*.gguf", f"*{tag.upper()}*.gguf"])
        files = sorted(
            p for p in snapshot.rglob("*.gguf") if tag.lower() in p.name.lower() and "mmproj" not in p.name
        )
        if len(files) != 1:
            found = ", ".join(p.name for p in files) or "none"
            raise CheckpointError(f"{model}: expected one .gguf file tagged {tag} in {repo}, found {found}")
        return files[0]
    snapshot = fetch(_SMALL)
    native = (snapshot / "params.json").is_file()
    return fetch([*_SMALL, "consolidated.safetensors" if native else "model*.safetensors"])
