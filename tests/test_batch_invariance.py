"""Batch invariance (on by default): a request's tokens and logprobs are the same bits alone, in a
batch of 16, after a 600-token shared prefix came from the prefix cache, with its prompt cut into
small chunks, and after preemption and recompute — greedy and seeded sampling, on the demo model
(bfloat16) and on a tiny Mistral3 with images (float32 and bfloat16); the cached, chunked and preempted
runs on the fused step (`engine.fused`), the others eager. The same checks run again in
subprocesses that force narrower instruction sets, so the AVX2, AVX-512 and AVX-512 BF16 code
paths are exercised next to the machine's own (AMX here) on whatever CPU runs the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from servers import ServerProcess
from test_api import metrics
from test_engine import data_url, question

from levante import kernels
from levante.engine import EngineConfig, SamplingParams
from levante.engine.engine import Engine
from levante.engine.fused import FusedStep
from levante.engine.kv_cache import KVStore
from levante.loader import LoadedModel, demo_model_path, load
from levante.model.layers import RMSNorm
from levante.tokenizer import PromptInputs

PREFIX = " ".join(question(100 + i) for i in range(10))  # 600+ tokens in both vocabularies
Result = tuple[list[int], list[tuple[float, list[tuple[int, float]]]]]


def prompts(loaded: LoadedModel, images: bool) -> list[PromptInputs]:
    """16 chats sharing a ≥600-token first part; with `images`, every fourth holds an image."""
    chats = []
    for i in range(16):
        parts: list[dict] = [{"type": "text", "text": PREFIX}]
        if images and i % 4 == 0:
            parts.append({"type": "image_url", "image_url": {"url": data_url(40 + 8 * i, 30, i)}})
        parts.append({"type": "text", "text": " ".join(question(i).split()[:12])})
        chats.append([{"role": "user", "content": parts}])
    encoded = [loaded.tokenizer.encode_chat(chat) for chat in chats]
    shared = shared_prefix([e.tokens for e in encoded])
    assert shared >= 600, shared
    return encoded


def shared_prefix(token_lists: list[list[int]]) -> int:
    n = 0
    while all(len(t) > n and t[n] == token_lists[0][n] for t in token_lists):
        n += 1
    return n


def params() -> list[SamplingParams]:
    """Greedy with top-5 logprobs, every other one sampled with its own seed."""
    return [
        SamplingParams(temperature=0, max_tokens=10, logprobs=5, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=10, logprobs=5, ignore_eos=True)
        for i in range(16)
    ]


def run(engine: Engine, inputs: list[PromptInputs], together: bool, warm: int = 0) -> list[Result]:
    """Each request's tokens and logprobs; all admitted at once, or each run alone. `warm` requests
    run first, alone, so the others find their prefix in the cache."""
    results: dict[str, Result] = {}

    def drain() -> None:
        while engine.has_unfinished():
            for delta in engine.step():
                tokens, logprobs = results[delta.request_id]
                tokens += delta.token_ids
                logprobs += [(s.logprob, s.top_logprobs) for s in delta.logprobs]

    for i, (prompt, p) in enumerate(zip(inputs, params()[: len(inputs)], strict=True)):
        results[f"r{i}"] = ([], [])
        engine.add_request(f"r{i}", prompt, p)
        if not together or i < warm:
            drain()
    drain()
    return [results[f"r{i}"] for i in range(len(inputs))]


def kv_gib(loaded: LoadedModel, tokens: int) -> float:
    text = loaded.config.text
    per_token = KVStore.bytes_per_token(text.num_layers, text.num_kv_heads, text.head_dim, _dtype(loaded))
    return tokens * per_token / (1 << 30)


def _dtype(loaded: LoadedModel) -> torch.dtype:
    return loaded.model.decoder.norm.weight.dtype


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> tuple[Path, int]:
    """The checkpoint and how many requests its uncached all-at-once run takes: the demo model
    pays every prompt token there, so 8 of the 16; its cached and chunked runs take all 16."""
    if request.param == "demo":
        return demo_model_path(), 8
    return request.getfixturevalue("tiny_mistral"), 16


# the demo in bfloat16 only: its GGUF blocks with float32 activations are checked row by row in any
# batch at the kernel (test_quantized), and its float32 run here took a minute of the suite
@pytest.mark.parametrize(
    ("model", "dtype"),
    [("demo", "bfloat16"), ("tiny_mistral3", "float32"), ("tiny_mistral3", "bfloat16")],
    indirect=["model"],
)
def test_same_bits_alone_batched_cached_chunked_and_preempted(model: tuple[Path, int], dtype: str) -> None:
    path, uncached = model
    loaded = load(path, dtype=dtype, progress=False)
    inputs = prompts(loaded, images=loaded.model.vision is not None)
    longest = max(len(p.tokens) for p in inputs) + 10

    def engine(fused: bool = False, **kw: object) -> Engine:
        """fused: the step's layers in one kernel call (`compile` on CPU), which must give the eager
        step's bits."""
        config = dict(kv_cache_memory=kv_gib(loaded, 16 * longest), max_num_seqs=16, compile=fused)
        config.update(kw)
        built = Engine(loaded.model, loaded.tokenizer, EngineConfig(**config))  # type: ignore[arg-type]
        assert built.runner.batch_invariant
        assert isinstance(built.runner.paged, FusedStep) == fused
        return built

    # the reference: nothing cached, each request alone (only the first 4: every prompt is paid in
    # full here and in `together`, the other runs are mostly cache hits or small chunks)
    alone = run(engine(prefix_caching=False), inputs[:4], together=False)
    assert len({tuple(tokens) for tokens, _ in alone}) > 1  # the answers differ from each other

    together = run(engine(prefix_caching=False, max_num_batched_tokens=16 * longest), inputs[:uncached], True)
    assert together[:4] == alone

    cached = engine(fused=True)
    every = run(cached, inputs, together=True, warm=1)
    assert every[:uncached] == together
    assert cached.blocks.prefix_hits >= 15 * 592

    chunked = engine(fused=True, max_num_batched_tokens=37)
    chunked.keep_step_log = True
    assert run(chunked, inputs, together=True) == every
    assert max(sum(n for _, n in step) for step in chunked.step_log) <= 37

    tiny_cache = kv_gib(loaded, longest + 64)
    preempted = engine(
        fused=True, kv_cache_memory=tiny_cache, prefix_caching=False, max_num_batched_tokens=40
    )
    assert run(preempted, inputs[:3], together=True) == alone[:3]
    assert preempted.stats.preemptions > 0


def test_served_answers_are_the_same_bits_one_at_a_time_and_all_at_once(demo: ServerProcess) -> None:
    """The report's case through the real server in its default dtype: 16 greedy chats one at a
    time, then all at once."""
    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id

    def ask(i: int) -> tuple[str, list[float]]:
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question(i)}],
            temperature=0,
            max_tokens=16,
            logprobs=True,
        )
        choice = answer.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content
        return choice.message.content or "", [t.logprob for t in choice.logprobs.content]

    one_by_one = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        at_once = list(pool.map(ask, range(16)))
    assert at_once == one_by_one
    assert metrics(demo.url)["levante:batch_invariant"] == 1
    assert "batch-invariant mode: on" in demo.log.read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [576, 100, 5120])
def test_linear_kernel_rows_are_the_same_bits_in_any_batch(dtype: torch.dtype, features: int) -> None:
    """Row r of x·wᵀ alone, at any batch size and at any place in the batch (a shuffle), and the
    same bits from the weight packed as the engine packs it."""
    assert kernels.load()
    gen = torch.Generator().manual_seed(features)
    w = (torch.randn(333, features, generator=gen) * 0.05).to(dtype)
    x = torch.randn(300, features, generator=gen).to(dtype)
    full = kernels.linear(x, w)
    for m in (1, 2, 3, 5, 16, 17, 33, 64, 65, 129):
        assert torch.equal(kernels.linear(x[:m], w), full[:m]), m
    order = torch.randperm(300, generator=gen)
    assert torch.equal(kernels.linear(x[order], w), full[order])
    packed = kernels.pack(w)  # 333 rows and 100 features: padded past both in the packed layout
    assert packed.dim() in (4, 5)  # four rows interleaved, or AMX tiles
    for m in (1, 5, 300):
        assert torch.equal(kernels.linear(x[:m], packed, 333), full[:m]), m
    exact = x.double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full.double(), exact, atol=tol * features**0.5, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [576, 100, 5120])
def test_rms_norm_kernel_rows_are_the_same_bits_in_any_batch(dtype: torch.dtype, features: int) -> None:
    """Row r alone, in any batch; within the dtype's rounding of float64's norm (the normed value
    is rounded to the dtype before the weight's product, as the module does), and within two of
    the dtype's ulps of the module's own result."""
    assert kernels.load()
    gen = torch.Generator().manual_seed(features)
    x = (torch.randn(70, features, generator=gen) * 3).to(dtype)
    norm = RMSNorm(features, 1e-5)
    norm.weight.data = (torch.rand(features, generator=gen) + 0.5).to(dtype)
    full = kernels.rms_norm(x, norm.weight, norm.eps)
    for m in (1, 2, 5, 17):
        assert torch.equal(kernels.rms_norm(x[-m:], norm.weight, norm.eps), full[-m:]), m
    exact = norm.weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-22
    torch.testing.assert_close(full.double(), exact, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(full, norm(x), rtol=2 * ulp, atol=0)


FORCED = {  # each: the build it must give, and what forces it
    "avx2": ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "avx512-no-bf16": ("_nobf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "avx512-bf16-no-amx": ("_noamx", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
}


NARROWER = [  # the kernels' tests: the loader's and CLI's run once, in the main run
    "-k",
    "not demo and not served and not at_load and not cli and not mixed_type and not narrows"
    " and not refused_where",
]


Started = dict[str, tuple[subprocess.Popen, Path]]
STARTED = pytest.StashKey[Started]()


def start_narrower_runs(logs: Path) -> Started:
    """Every forced-ISA subprocess started at once, at the lowest CPU priority: the suite's conftest
    starts them when collection ends and runs the tests that read them last, so their kernel builds
    (one single-threaded compile each) and tests take only what the rest of the suite leaves idle."""
    tests = [
        __file__,
        *(str(Path(__file__).with_name(f)) for f in ("test_attention.py", "test_quantized.py")),
    ]
    pytest_ = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *NARROWER]
    command = ["nice", "-n", "19", *pytest_]
    started = {}
    for isa, (_, forced) in FORCED.items():
        env = {**os.environ, **forced, "LEVANTE_FORCED_ISA": isa}
        log = logs / f"{isa}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        started[isa] = proc, log
    return started


@pytest.fixture(scope="module")
def narrower_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str]]:
    """The exit status and output of each forced-ISA run (started here if collection did not)."""
    started = request.config.stash.get(STARTED, None)
    started = started or start_narrower_runs(tmp_path_factory.mktemp("narrower"))
    return {isa: (proc.wait(timeout=900), log.read_text()) for isa, (proc, log) in started.items()}


@pytest.mark.skipif(
    bool(os.environ.get("LEVANTE_FORCED_ISA")),
    reason="this run is itself a forced-ISA subprocess of that test and must not start another",
)
@pytest.mark.parametrize("isa", list(FORCED))
def test_the_same_holds_on_narrower_instruction_sets(
    isa: str, narrower_runs: dict[str, tuple[int, str]]
) -> None:
    """This file's kernel and tiny-Mistral3 checks, the attention kernel's tests and the quantized
    matmul's (each type against gguf's dequantization and the integer reference), in a
    subprocess whose kernels (and ATen's and oneDNN's) are built for a narrower ISA than this
    machine's. On a machine that lacks an ISA the build for it is the machine's own: the checks
    still run, on the code that machine would use."""
    build, forced = FORCED[isa]
    env = {**os.environ, **forced, "LEVANTE_FORCED_ISA": isa}
    probe = [sys.executable, "-c", "from levante import kernels; print(kernels.target()[0])"]
    name = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert name.startswith(build) if build == "avx2" else name.endswith(build), name
    status, output = narrower_runs[isa]
    assert status == 0, output[-6000:]
    assert " passed" in output and "failed" not in output


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_an_fp8_kv_cache_holds_twice_the_tokens_and_the_same_bits_in_any_batch(
    tiny_mistral: Path, kv_cache_dtype: str
) -> None:
    """`--kv-cache-dtype fp8`: the same memory holds twice the tokens; answers stay batch-invariant
    through prefix-cache hits, chunked prefill and preemption (how close they stay to a bfloat16
    cache, on the demo model: benchmarks/RESULTS.md)."""
    loaded = load(tiny_mistral, dtype="bfloat16", progress=False)
    inputs = prompts(loaded, images=True)
    longest = max(len(p.tokens) for p in inputs) + 10

    def engine(fused: bool = False, **kw: object) -> Engine:
        config = dict(kv_cache_memory=kv_gib(loaded, 16 * longest), max_num_seqs=16, compile=fused)
        config.update({"kv_cache_dtype": kv_cache_dtype, **kw})
        built = Engine(loaded.model, loaded.tokenizer, EngineConfig(**config))  # type: ignore[arg-type]
        assert isinstance(built.runner.paged, FusedStep) == fused
        return built

    alone = run(engine(prefix_caching=False), inputs[:4], together=False)
    assert alone[0][0]
    fp8, bf16 = engine(), engine(kv_cache_dtype="auto")  # the same GiB
    assert fp8.capacity == 2 * bf16.capacity and fp8.runner.batch_invariant
    every = run(fp8, inputs, together=True, warm=1)
    assert every[:4] == alone and fp8.blocks.prefix_hits > 0
    chunked = engine(fused=True, max_num_batched_tokens=37)
    assert run(chunked, inputs, together=True) == every
    preempted = engine(
        kv_cache_memory=kv_gib(loaded, longest + 64) / 2, prefix_caching=False, max_num_batched_tokens=40
    )
    assert run(preempted, inputs[:3], together=True) == alone[:3]
    assert preempted.stats.preemptions > 0


def test_an_unknown_kv_cache_dtype_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, not 'int8'"
    ):
        EngineConfig(kv_cache_dtype="int8")
