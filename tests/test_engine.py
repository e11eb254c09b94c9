"""The engine against the reference loop: batching, paging, prefix caching, chunked prefill,
preemption, seeds and the loop guard must never change what a request gets."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from levante.engine import LLM, EngineConfig, RepetitionDetection, RequestError, SamplingParams
from levante.engine.async_engine import AsyncEngine
from levante.reference import DenseKVCache, generate_tokens
from levante.tokenizer import PromptInputs

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()


def question(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 120))))


def reference(llm: LLM, inputs: PromptInputs, max_tokens: int) -> list[int]:
    """The model issue's reference loop, one request at a time."""
    images = [torch.from_numpy(img) for img in inputs.images]
    stop = llm.tokenizer.eos_token_ids
    out = [
        t for t, _ in generate_tokens(llm.engine.model, inputs.tokens, images=images, max_tokens=max_tokens)
    ]
    return out[: next((i + 1 for i, t in enumerate(out) if t in stop), len(out))]


def data_url(w: int, h: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    """Dequantized at load: the engine against the reference loop, token for token, needs float
    matmuls (int8 activations turn the two paths' last-bit differences into changed greedy tokens
    at near-ties; the quantized engine against itself is test_batch_invariance's)."""
    config = EngineConfig(kv_cache_memory=0.5, max_num_seqs=32, max_num_batched_tokens=512)
    return LLM(engine=config, quantized=False)


@pytest.fixture(scope="module")
def tiny_llm(tiny_mistral: Path) -> LLM:
    return LLM(tiny_mistral, engine=EngineConfig(kv_cache_memory=0.05, max_num_batched_tokens=256))


def test_batch_of_32_equals_one_at_a_time_on_the_demo_model(demo_llm: LLM) -> None:
    prompts = [[{"role": "user", "content": question(i)}] for i in range(32)]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    results = demo_llm.generate(prompts, greedy)
    assert len({len(r.prompt_token_ids) for r in results}) > 20  # really mixed lengths
    # every other one against the reference loop (which recomputes the whole sequence per token)
    for prompt, result in list(zip(prompts, results, strict=True))[::2]:
        inputs = demo_llm.tokenizer.encode_chat(prompt)
        assert result.outputs[0].token_ids == reference(demo_llm, inputs, 12)
    assert demo_llm.engine.blocks.num_free == demo_llm.engine.blocks.num_blocks


def test_batch_with_images_equals_one_at_a_time(tiny_llm: LLM) -> None:
    prompts = [
        image_chat("describe", data_url(100, 60, 1)),
        [{"role": "user", "content": question(3)}],
        image_chat("compare these", data_url(28, 28, 2), data_url(300, 200, 3)),
        image_chat("again", data_url(100, 60, 1)),
        [{"role": "user", "content": question(4)}],
        image_chat("and this one", data_url(56, 90, 4)),
    ]
    results = tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, result in zip(prompts, results, strict=True):
        inputs = tiny_llm.tokenizer.encode_chat(prompt)
        assert result.outputs[0].token_ids == reference(tiny_llm, inputs, 10)


def test_prefix_cache_computes_only_the_suffix_and_changes_nothing(tiny_mistral: Path) -> None:
    llm = LLM(tiny_mistral, engine=EngineConfig(kv_cache_memory=0.05, max_num_batched_tokens=4096))
    engine = llm.engine
    prefix = llm.tokenizer.encode(question(7) * 12, add_bos=True)[:1000]
    first, second = PromptInputs([*prefix, 1100, 1200, 1300]), PromptInputs([*prefix, 1400, 1500])
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(first, greedy)
    engine.keep_step_log = True
    cached = llm.generate(second, greedy)[0]
    fed = sum(n for step in engine.step_log for _, n in step)
    assert cached.cached_tokens == 992  # 62 full blocks of 16
    assert fed == len(second.tokens) - 992 + 7  # the suffix, then one token per decode step
    uncached = LLM(tiny_mistral, engine=EngineConfig(kv_cache_memory=0.05, prefix_caching=False))
    assert cached.outputs[0].token_ids == uncached.generate(second, greedy)[0].outputs[0].token_ids


def test_same_text_with_other_images_shares_nothing_after_the_image(tiny_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    text = "what is in this picture? " * 5
    a = tiny_llm.tokenizer.encode_chat(image_chat(text, data_url(100, 60, 1)))
    b = tiny_llm.tokenizer.encode_chat(image_chat(text, data_url(100, 60, 2)))
    assert a.tokens == b.tokens  # same placeholders: only the pixels differ
    tiny_llm.generate(a, greedy)
    result = tiny_llm.generate(b, greedy)[0]
    first_image_token = a.tokens.index(10)
    assert result.cached_tokens <= first_image_token
    assert result.outputs[0].token_ids == reference(tiny_llm, b, 2)


def test_chunked_prefill_keeps_decodes_going_and_changes_nothing(tiny_long_context: Path) -> None:
    config = EngineConfig(kv_cache_memory=0.1, max_num_batched_tokens=1024)
    llm = LLM(tiny_long_context, engine=config)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = [PromptInputs([1, *range(2000 + 10 * i, 2010 + 10 * i)]) for i in range(8)]
    long_prompt = PromptInputs([1, *(np.random.default_rng(0).integers(1000, 130000, 16383).tolist())])
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)

    for i, p in enumerate(short):
        engine.add_request(f"short{i}", p, greedy)
    step()  # the short prompts are prefilled and decoding
    engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.keep_step_log = True
    while engine.has_unfinished():
        step()
    prefill_steps = [dict(step) for step in engine.step_log if step and dict(step).get("long", 0) > 1]
    assert len(prefill_steps) >= 16  # 16K tokens in chunks of at most 1024
    for step in prefill_steps:
        assert all(step.get(f"short{i}") == 1 for i in range(8)), step  # every decode advanced
    unchunked = LLM(tiny_long_context, engine=EngineConfig(kv_cache_memory=0.1, max_num_batched_tokens=17000))
    expected = unchunked.generate(
        [*short, long_prompt], [greedy] * 8 + [SamplingParams(temperature=0, max_tokens=4)]
    )
    assert [outputs[f"short{i}"] for i in range(8)] == [r.outputs[0].token_ids for r in expected[:8]]
    assert outputs["long"] == expected[8].outputs[0].token_ids


def test_prompt_logprobs_equal_a_full_forward_even_chunked_and_with_a_cached_prefix(
    tiny_mistral: Path,
) -> None:
    llm = LLM(tiny_mistral, engine=EngineConfig(kv_cache_memory=0.05, max_num_batched_tokens=16))
    prompt = PromptInputs([1, *range(4000, 4049)])
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2))  # caches the prefix blocks
    scored = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))[0]
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
    assert scored.prompt_logprobs is not None and scored.prompt_logprobs[0] is None
    model = llm.engine.model
    cache = DenseKVCache(len(model.decoder.layers))
    cache.plan([0], [len(prompt.tokens)])
    with torch.inference_mode():
        ids = torch.tensor(prompt.tokens)
        full = torch.log_softmax(model.logits(model(ids, torch.arange(len(ids)), cache)), -1)
    for pos, smp in enumerate(scored.prompt_logprobs[1:], start=1):
        assert smp is not None and smp.token == prompt.tokens[pos]
        assert smp.logprob == pytest.approx(float(full[pos - 1, smp.token]), abs=1e-4)
        assert [t for t, _ in smp.top_logprobs] == full[pos - 1].topk(3).indices.tolist()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_preemption_under_a_tiny_cache_changes_nothing(tiny_mistral: Path) -> None:
    llm = LLM(tiny_mistral, engine=EngineConfig(kv_cache_memory=6e-5, max_num_batched_tokens=64))
    assert llm.engine.capacity <= 64
    prompts = [PromptInputs([1, *range(3000 + 20 * i, 3000 + 20 * i + 10)]) for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = llm.generate(prompts, greedy)
    assert llm.engine.stats.preemptions > 0
    for p, r in zip(prompts, results, strict=True):
        assert r.outputs[0].token_ids == reference(llm, p, 20)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_seeded_request_is_the_same_alone_and_in_a_batch_of_16(tiny_llm: LLM) -> None:
    prompt = [{"role": "user", "content": "tell me a story"}]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = tiny_llm.generate(prompt, seeded)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=t, top_k=k, max_tokens=m, ignore_eos=True)
        for t, k, m in zip([0.0, 0.5, 1.2, 0.7] * 4, [0, 5, 50, 0] * 4, range(5, 20), strict=False)
    ]
    batch = [[{"role": "user", "content": question(i)}] for i in range(15)]
    results = tiny_llm.generate([*batch[:7], prompt, *batch[7:]], [*others[:7], seeded, *others[7:]])
    assert results[7].outputs[0].token_ids == alone
    assert tiny_llm.generate(prompt, seeded)[0].outputs[0].token_ids == alone


def test_n_choices_share_the_prompt_blocks(tiny_llm: LLM) -> None:
    prompt = PromptInputs([1, *range(5000, 5100)])
    before = tiny_llm.engine.blocks.prefix_hits
    result = tiny_llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))[0]
    assert len(result.outputs) == 3 and all(o.finish_reason for o in result.outputs)
    assert tiny_llm.engine.blocks.prefix_hits - before >= 2 * 96  # siblings reuse 6 full blocks each
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1


def test_loop_guard_stops_a_forced_loop(tiny_llm: LLM) -> None:
    prompt = PromptInputs([1, 3, 2000, 2001, 4])
    loop = {7000: 50.0, 7001: 49.5}  # the tiny model can only alternate or repeat these
    guard = RepetitionDetection(max_pattern_size=4, min_count=4)
    stopped = tiny_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=200, logit_bias=loop, repetition_detection=guard)
    )[0].outputs[0]
    assert stopped.finish_reason == "repetition" and len(stopped.token_ids) < 20
    unguarded = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, logit_bias=loop))[0]
    assert unguarded.outputs[0].finish_reason == "length"
    assert tiny_llm.engine.stats.loop_stops >= 1


def test_stop_strings_and_token_ids(demo_llm: LLM) -> None:
    prompt = [{"role": "user", "content": "List the days of the week."}]
    free = demo_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert "Wednesday" in free.text
    cut = demo_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=["nesday", "xyz"]))
    out = cut[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", "nesday")
    assert out.text == free.text[: free.text.index("nesday")]
    by_id = demo_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(free.token_ids[3],))
    )[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:4] and by_id.stop_reason == free.token_ids[3]


def test_bad_requests_are_rejected_clearly(tiny_llm: LLM, tiny_long_context: Path) -> None:
    engine = tiny_llm.engine
    with pytest.raises(RequestError, match="context"):
        engine.add_request("long", PromptInputs([1] * (engine.max_model_len + 5)), SamplingParams())
    small = LLM(tiny_long_context, engine=EngineConfig(kv_cache_memory=3e-4))
    with pytest.raises(RequestError, match="never fit"):
        small.engine.add_request("big", PromptInputs([1] * (small.engine.capacity + 10)), SamplingParams())
    with pytest.raises(RequestError, match="logit_bias"):
        engine.add_request("bias", PromptInputs([1, 2]), SamplingParams(logit_bias={10**7: 1.0}))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", PromptInputs([]), SamplingParams())
    assert not engine.has_unfinished()


def test_abort_frees_every_block_at_once(tiny_llm: LLM) -> None:
    engine = tiny_llm.engine
    for i in range(4):
        engine.add_request(f"a{i}", PromptInputs([1, *range(6000, 6100)]), SamplingParams(max_tokens=500))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    for i in range(4):
        assert engine.abort(f"a{i}")
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()
    assert not engine.abort("a0")


def test_async_engine_streams_deltas_and_aborts_on_early_exit(tiny_llm: LLM) -> None:
    engine = AsyncEngine(tiny_llm.engine)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = PromptInputs([1, 3, 2100, 2200, 4])

    async def scenario() -> tuple[list[int], int]:
        tokens = [t async for out in engine.generate(prompt, greedy) for t in out.token_ids]
        stream = engine.generate(prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), "leaver")
        async for _ in stream:
            break
        await stream.aclose()  # the client went away
        blocks = tiny_llm.engine.blocks
        deadline = time.monotonic() + 1.0  # the engine thread frees them before its next step
        while blocks.num_free != blocks.num_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return tokens, blocks.num_free

    try:
        tokens, free = asyncio.run(scenario())
    finally:
        engine.close()
    assert tokens == reference(tiny_llm, prompt, 12)
    assert free == tiny_llm.engine.blocks.num_blocks
