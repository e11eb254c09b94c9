"""The `levante` command as a user runs it: a real process, real files, one clear line on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from levante.testing import write_model_dir
from levante.testing.checkpoints import TinySpec


def levante(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "levante.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vision=False, max_position_embeddings=2048)
    return write_model_dir(tmp_path_factory.mktemp("cli_tiny"), spec)


def test_generate_streams_an_answer(tiny_text: Path) -> None:
    done = levante("generate", "--model", str(tiny_text), "--prompt", "hello", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_generate_with_an_image_on_a_text_model_fails_clearly(tiny_text: Path, tmp_path: Path) -> None:
    image = tmp_path / "pixel.png"
    from PIL import Image

    Image.new("RGB", (30, 20), "red").save(image)
    done = levante("generate", "--model", str(tiny_text), "--prompt", "what?", "--image", str(image))
    assert done.returncode == 1
    assert "image" in done.stderr.lower() and "Traceback" not in done.stderr


def test_chat_answers_each_turn_and_exits(tiny_text: Path) -> None:
    done = levante("chat", "--model", str(tiny_text), "--max-tokens", "4", stdin="hi\nand again\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("> ") >= 2


DAMAGES = {
    "missing": "no such",
    "truncated": "model.safetensors",
    "architecture": "architecture",
    "tokenizer": "tokenizer",
    "not_an_image": "not a readable image",
}


def damaged(tiny_text: Path, folder: Path, damage: str) -> list[str]:
    """A copy of the tiny model with one thing wrong; the `levante generate` arguments that meet it."""
    model = folder / "model"
    model.mkdir(parents=True)
    for f in tiny_text.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    extra: list[str] = []
    if damage == "missing":
        model = folder / "nowhere"
    elif damage == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "architecture":
        config = model / "config.json"
        config.write_text(config.read_text().replace("MistralForCausalLM", "GPT2LMHeadModel"))
    elif damage == "tokenizer":
        (model / "tekken.json").unlink()
    else:
        fake = folder / "photo.png"
        fake.write_text("this is text, not pixels")
        extra = ["--image", str(fake)]
    return ["generate", "--model", str(model), "--prompt", "hi", *extra]


@pytest.fixture(scope="module")
def damaged_runs(tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Every damaged model's run started at once (each is mostly Python starting up, so on two
    cores they overlap): exit status and stderr of each."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    running = {}
    for damage in DAMAGES:
        args = damaged(tiny_text, tmp_path_factory.mktemp(damage), damage)
        running[damage] = subprocess.Popen(
            [sys.executable, "-m", "levante.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    stderr = {damage: proc.communicate(timeout=300)[1] for damage, proc in running.items()}
    return {damage: (proc.returncode, stderr[damage]) for damage, proc in running.items()}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_bad_files_give_one_clear_line(damaged_runs: dict[str, tuple[int, str]], damage: str) -> None:
    status, stderr = damaged_runs[damage]
    assert status == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and DAMAGES[damage] in lines[0].lower(), stderr
