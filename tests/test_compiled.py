"""The compiled step (`levante.engine.compiled`) against the eager one it replaces: the same greedy
tokens for 32 mixed chats on a tiny Mistral3 with images, its weights float32 and as int4 blocks
(bfloat16, the GGUF kernels' path), with requests joining and leaving mid-run, grammar-constrained
requests, preemption, and steps padded to CUDA-graph buckets (run here on CPU); the artifact a start
saves is what the next start with the same structure loads (other weights, another cache size), a
damaged one is compiled again; a failing compile and `--enforce-eager` leave the engine eager with
one log line. Tensor parallelism compiled: `test_tensor_parallel`'s server. (On CPU the engine runs
the demo model's step fused, not through Inductor: `test_fused`.)"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import data_url, question

from levante import kernels
from levante.cli import main
from levante.engine import EngineConfig, SamplingParams
from levante.engine.compiled import CompiledStep, buckets
from levante.engine.engine import Engine
from levante.engine.grammar import json_schema_grammar
from levante.loader import LoadedModel, load
from levante.tokenizer import PromptInputs

ANSWER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}


def chats(loaded: LoadedModel, images: bool) -> list[PromptInputs]:
    """32 chats of 3 to 120 words, some with a system prompt or an earlier turn; with `images`,
    every fifth holds one."""
    out = []
    for i in range(32):
        content: list[dict] = [{"type": "text", "text": question(i)}]
        if images and i % 5 == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(28 + 4 * i, 28, i)}})
        messages = [{"role": "user", "content": content}]
        if i % 3 == 1:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        if i % 7 == 2:
            messages[-1:-1] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        out.append(loaded.tokenizer.encode_chat(messages))
    return out


def params(i: int) -> SamplingParams:
    """Greedy, 2 to 13 tokens (so requests leave while others run); every fourth bound to a JSON
    schema by its grammar."""
    grammar = json_schema_grammar(ANSWER) if i % 4 == 3 else None
    tokens = 2 + (5 * i) % 12
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=grammar is None, grammar=grammar)


def run(engine: Engine, inputs: list[PromptInputs]) -> list[list[int]]:
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(inputs):
        tokens[f"r{i}"] = []
        engine.add_request(f"r{i}", prompt, params(i))
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
    return [tokens[f"r{i}"] for i in range(len(inputs))]


@pytest.fixture(scope="module", params=["float32", "int4"])
def loaded(request: pytest.FixtureRequest, tiny_mistral: Path) -> LoadedModel:
    """The tiny Mistral3 dense in float32, or its projections as int4 blocks (bfloat16): Inductor
    compiles a graph through the quantized kernels as through the dense ones."""
    if request.param == "int4":
        return load(tiny_mistral, dtype="bfloat16", quantization="int4", progress=False)
    return load(tiny_mistral, dtype="float32", progress=False)


def engine(loaded: LoadedModel, compile: bool, **config: object) -> Engine:
    """compile: Inductor's step (the fused one, which these models could take, has its own tests)."""
    settings = dict(kv_cache_memory=0.05, max_num_seqs=8, max_num_batched_tokens=256, compile=compile)
    settings["fuse_layers"] = False
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(**{**settings, **config}))  # type: ignore[arg-type]


def test_compiled_step_gives_the_eager_tokens(loaded: LoadedModel) -> None:
    assert kernels.load(), "the CPU kernels did not build"
    inputs = chats(loaded, images=loaded.model.vision is not None)
    eager = run(engine(loaded, False), inputs)
    assert len({tuple(t) for t in eager}) > 16  # the answers differ from each other
    compiled = engine(loaded, True)
    step = compiled.runner.paged
    assert isinstance(step, CompiledStep) and step.compiled is not None
    inner, checked = step.compiled, []
    assert isinstance(inner, functools.partial)  # the artifact, bound to its runner

    def guarded(*args: torch.Tensor) -> torch.Tensor:  # the guards the artifact runs without
        checked.append(inner.func.guard_check(*inner.args, *args))
        return inner(*args)

    step.compiled = guarded
    assert run(compiled, inputs) == eager
    # the warm-up's one graph, traced for one row, serves every step without an image to encode
    assert len(checked) > 20 and all(checked)
    assert step.compiled is guarded  # never fell back to eager on the way

    # preempted and recomputed: a cache of a little more than one request's worth
    tiny = engine(loaded, True, kv_cache_memory=_gib(loaded, 200), max_num_batched_tokens=64)
    assert run(tiny, inputs[:6]) == eager[:6]
    assert tiny.stats.preemptions > 0 and tiny.runner.paged.compiled is not None


def _gib(loaded: LoadedModel, tokens: int) -> float:
    text = loaded.config.text
    element = loaded.model.decoder.norm.weight.element_size()
    return tokens * 2 * text.num_layers * text.num_kv_heads * text.head_dim * element / (1 << 30)


def test_steps_padded_to_cuda_graph_buckets_give_the_eager_tokens(tiny_mistral: Path) -> None:
    """The padding a CUDA graph needs (rows up to the next bucket writing only the scratch block,
    table widths up to a power of two), exercised on CPU: batches of 1 to 8 rows hit and miss the
    buckets 1, 2, 4, 8."""
    assert buckets(8) == [1, 2, 4, 8] and buckets(20) == [1, 2, 4, 8, 16, 20] and buckets(1) == [1]
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    inputs = chats(loaded, images=False)[:12]
    eager = run(engine(loaded, False), inputs)
    padded = engine(loaded, False)
    step = CompiledStep(padded.runner, buckets(8))
    step.warm_up()
    compiled, fed = step.compiled, []
    assert compiled is not None
    step.compiled = lambda *args: fed.append(tuple(args[0].shape) + tuple(args[5].shape)) or compiled(*args)
    padded.runner.paged = step
    padded.keep_step_log = True
    assert run(padded, inputs) == eager and step.compiled is not None
    asked = {sum(n for _, n in s) for s in padded.step_log}
    assert asked & {3, 5, 6, 7}  # batches between buckets were asked for ...
    rows = {t for t, _, _ in fed if t <= 8}
    assert rows and rows <= {1, 2, 4, 8}  # ... and padded to one
    assert all(count == t and width & (width - 1) == 0 for t, count, width in fed if t <= 8)


def test_the_saved_step_serves_the_next_start_with_the_same_structure(
    tiny_mistral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A start compiles and saves the step; the next start with the same structure loads it (no
    trace) and computes with its own weights and cache: a model whose weights differ gives its own
    eager tokens, not the first model's, with a cache of another size. A damaged file is compiled
    again over, with a warning; another structure (bfloat16) gets its own artifact."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    first = load(tiny_mistral, dtype="float32", progress=False)
    other = load(tiny_mistral, dtype="float32", progress=False)
    with torch.no_grad():
        for p in other.model.decoder.parameters():
            p.mul_(-1.5)
    inputs = chats(first, images=False)[:8]
    wanted = {id(m): run(engine(m, False), inputs) for m in (first, other)}
    assert wanted[id(first)] != wanted[id(other)]

    def started(loaded: LoadedModel, **config: object) -> tuple[str, list[list[int]]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="levante.engine"):
            built = engine(loaded, True, **config)
        said = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
        assert built.runner.paged.compiled is not None
        return " / ".join(said), run(built, inputs)

    said, tokens = started(first)
    assert said.startswith("compiled the step in") and tokens == wanted[id(first)]
    (artifact,) = (tmp_path / "levante_steps").iterdir()
    said, tokens = started(other, kv_cache_memory=0.02)
    assert said.startswith(f"loaded the compiled step from {artifact} in"), said
    assert tokens == wanted[id(other)]
    artifact.write_bytes(b"not a compiled step")
    said, tokens = started(first)
    assert said.startswith(f"the cached compiled step {artifact} did not load"), said
    assert said.endswith(" s") and "/ compiled the step in" in said and tokens == wanted[id(first)]
    started(load(tiny_mistral, dtype="bfloat16", progress=False))
    assert len(list((tmp_path / "levante_steps").iterdir())) == 2


def test_a_failing_compile_falls_back_to_eager_with_one_log_line(
    tiny_mistral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._inductor.config as inductor

    assert kernels.load(), "the CPU kernels did not build"  # else compile_runner declines before compiling
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no saved step to load instead
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    inputs = chats(loaded, images=False)[:4]
    torch._dynamo.reset()
    no_compiler = inductor.patch({"cpp.cxx": ("/nonexistent/c++",)})  # and no cached code (tmp_path)
    with no_compiler, caplog.at_level(logging.INFO, logger="levante.engine"):
        failed = engine(loaded, True)
    torch._dynamo.reset()
    lines = [r.getMessage() for r in caplog.records if "compil" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("compiling the step failed, running it eagerly: "), lines
    assert "InvalidCxxCompiler" in lines[0]
    assert failed.runner.paged == failed.runner.forward
    assert run(failed, inputs) == run(engine(loaded, False), inputs)


@pytest.mark.parametrize("flag", ["--enforce-eager", "--no-enforce-eager"])
def test_the_cli_compiles_unless_enforce_eager(
    flag: str, tiny_mistral: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    argv = ["generate", "--model", str(tiny_mistral), "--kv-cache-memory", "0.05", "--max-tokens", "4", flag]
    with caplog.at_level(logging.INFO, logger="levante.engine"):
        assert main([*argv, "--prompt", "Hello"]) == 0
    said = [r.getMessage() for r in caplog.records]
    steps = "compiled the step in|loaded the compiled step from|the paged step runs its layers in one call"
    compiled = [line for line in said if re.match(steps, line)]
    assert len(compiled) == (flag == "--no-enforce-eager")
    assert capsys.readouterr().out.strip()


def test_the_gpu_benchmark_runs_here_with_the_tiny_config() -> None:
    """benchmarks/gpu.py is written for a GPU; its tiny config runs the same code on CPU (int4 blocks
    on Levante's kernels; eager, the compiled step is tested above), so it keeps working until a GPU
    runs the 24B shape."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    argv = [
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--weights",
        "int4",
        "--tokens",
        "4",
        "--streams",
        "1",
        "2",
    ]
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--kv-cache-memory", "0.05"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert re.match(r"tiny int4 on CPU: 0\.0[1-9] GB of weights per step", lines[0]), lines
    for streams, line in zip((1, 2), lines[2:], strict=True):
        assert re.match(rf"\s*{streams} streams: +\d+\.\d tok/s, .* = \d+% of the bandwidth$", line), line
