"""Shared fixtures: tiny random checkpoints written by transformers itself (so our loader is
checked against files we did not write), and the demo GGUF."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from playwright.sync_api import Browser, sync_playwright
from servers import ServerProcess, free_port, running

from levante.loader import demo_model_path
from levante.testing import write_model_dir
from levante.testing.checkpoints import TinySpec

# The suite starts dozens of short-lived CLI engines and servers: they run eagerly (the reference)
# unless a test passes --no-enforce-eager; test_compiled checks the compiled step against them.
os.environ.setdefault("LEVANTE_ENFORCE_EAGER", "1")
# Servers started without --spaces-db keep the web app's Spaces here, not in the user's home.
os.environ.setdefault("LEVANTE_DATA_DIR", tempfile.mkdtemp(prefix="levante-data-"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The forced-ISA subprocesses (test_batch_invariance) start as soon as the tests are known, at
    the lowest CPU priority, and the tests reading their results run last: the suite spends much
    of its time waiting on servers and browsers, which is when they run."""
    narrower = [item for item in items if "narrower_runs" in getattr(item, "fixturenames", ())]
    if not narrower or os.environ.get("LEVANTE_FORCED_ISA"):
        return
    from test_batch_invariance import STARTED, start_narrower_runs

    items[:] = [item for item in items if item not in narrower] + narrower
    started = start_narrower_runs(Path(tempfile.mkdtemp(prefix="levante-narrower-")))
    config.stash[STARTED] = started
    config.add_cleanup(lambda: [proc.kill() for proc, _ in started.values() if proc.poll() is None])


def healthy_init(model: torch.nn.Module, seed: int) -> None:
    """Random weights with unit-scale activations, so logits are far apart and a parity test
    cannot pass by everything being near zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))


TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # != hidden_size / heads, as in Mistral Small
    intermediate_size=128,
    rope_theta=1e9,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def hf_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import MistralConfig, MistralForCausalLM

    ref = MistralForCausalLM(MistralConfig(**TEXT)).eval()
    healthy_init(ref, 0)
    path = tmp_path_factory.mktemp("hf_text")
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="session")
def hf_mm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    vision = PixtralVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        intermediate_size=128,
        patch_size=14,
        image_size=1540,
        hidden_act="silu",
        rope_theta=1e4,
    )
    cfg = Mistral3Config(
        text_config=MistralConfig(**TEXT),
        vision_config=vision,
        image_token_index=10,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,  # transformers 5 defaults to True for Mistral3; the real model is untied
    )
    ref = Mistral3ForConditionalGeneration(cfg).eval()
    healthy_init(ref, 1)
    path = tmp_path_factory.mktemp("hf_mm")
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    return demo_model_path()


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Mistral3 (vision) with the real Tekken vocabulary, fp32 for exact checks."""
    return write_model_dir(tmp_path_factory.mktemp("tiny_mistral"), TinySpec(dtype=torch.float32))


@pytest.fixture(scope="session")
def tiny_long_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny text-only Mistral with a 32K context and narrow attention, for long-prompt tests."""
    spec = TinySpec(
        vision=False,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=32768,
        dtype=torch.float32,
    )
    return write_model_dir(tmp_path_factory.mktemp("tiny_long"), spec, seed=5)


# ---- real servers, shared by the API test modules ----------------------------------------------


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    with running(["--kv-cache-memory", "0.25", "--max-model-len", "2048"], log) as server:
        yield server


@pytest.fixture(scope="session")
def client(demo: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tiny(tiny_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tiny Mistral3 with vision, an API key, images fetchable from 127.0.0.1 only, and a
    generation_config.json giving server-side defaults."""
    model = tmp_path_factory.mktemp("tiny_served") / "tiny"
    shutil.copytree(tiny_mistral, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    args = ["--model", str(model), "--kv-cache-memory", "0.05", "--api-key", "sk-test"]
    args += ["--allowed-media-domains", "127.0.0.1", "--served-model-name", "tiny"]
    with running(args, model.parent / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real local Ray cluster (head node, 2 CPUs) for the scale-out tests; yields its address
    (what `RAY_ADDRESS` takes). Started with --block in its own session, so stopping it stops only
    this cluster: a graceful stop first, then whatever of its session is left (Ray's graceful
    shutdown of Serve and Data workers takes half a minute, which the suite need not wait for)."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    command = [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = temp / "head.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        status = [str(ray_cli), "status", f"--address={address}"]
        while subprocess.run(status, capture_output=True).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless chromium driven by Playwright (`playwright install` cannot download here)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make setup` installs it (apt-get install -y chromium)"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()
