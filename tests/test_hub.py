"""`--model` as a Hugging Face repo id or a GGUF repo with a quant tag, offline against a
Hugging Face cache laid out as huggingface_hub writes it (no hub can be reached here): the real
`levante` command in a subprocess with HF_HUB_OFFLINE=1, and its errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from levante.loader import demo_model_path
from levante.testing import write_model_dir
from levante.testing.checkpoints import TinySpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = TinySpec(vision=False, dtype=torch.float32)


def cached_repo(cache: Path, repo: str, files: Path) -> Path:
    """`files` (a folder) as the snapshot of `repo` at `COMMIT`, with `refs/main` pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    shutil.copytree(files, snapshot, symlinks=True)  # the cache links its snapshot files to blobs too
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    cached_repo(cache, "acme/tiny", write_model_dir(tmp_path_factory.mktemp("tiny"), SPEC))
    ggufs = tmp_path_factory.mktemp("ggufs")
    for name in ("smol-Q4_1.gguf", "smol-Q8_0.gguf", "mmproj-smol-Q4_1.gguf"):
        (ggufs / name).symlink_to(demo_model_path())
    cached_repo(cache, "acme/smol-GGUF", ggufs)
    return cache


def levante(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "levante.cli", "-v", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_repo_id_loads_its_cached_snapshot(cache: Path) -> None:
    done = levante(cache, "generate", "--model", "acme/tiny", "--prompt", "Hi", "--max-tokens", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"snapshots/{COMMIT}" in done.stderr  # the loader's log names the snapshot it read


def test_a_quant_tag_picks_that_gguf_and_never_the_mmproj(cache: Path) -> None:
    done = levante(cache, "generate", "--model", "acme/smol-GGUF:q4_1", "--prompt", "Hi", "--max-tokens", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smol-Q4_1.gguf" in done.stderr and "mmproj" not in done.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("acme/absent", "acme/absent is not in the Hugging Face cache and the Hub cannot be reached"),
        (
            "acme/smol-GGUF:Q5_K",
            "acme/smol-GGUF:Q5_K: expected one .gguf file tagged Q5_K in acme/smol-GGUF, found none",
        ),
    ],
)
def test_what_cannot_be_had_offline_is_one_clear_line(cache: Path, model: str, message: str) -> None:
    done = levante(cache, "generate", "--model", model, "--prompt", "Hi", "--max-tokens", "1")
    assert done.returncode == 1
    assert f"levante: error: {message}" in done.stderr, done.stderr[-2000:]


def test_a_revision_that_is_not_cached_is_named(cache: Path) -> None:
    done = levante(cache, "generate", "--model", "acme/tiny", "--revision", "v2", "--prompt", "Hi")
    assert done.returncode == 1
    assert "acme/tiny@v2 is not in the Hugging Face cache" in done.stderr, done.stderr[-2000:]
