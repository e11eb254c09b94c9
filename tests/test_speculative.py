"""Speculation (`levante.engine.speculative`): greedy answers token for token, text for text and
logprob for logprob the ones decoding without it gives — on the demo model with prompts an answer
copies from, on a tiny Mistral3 with images, with a draft model — with stop strings, max_tokens,
n > 1, logprobs, grammar-bound requests, prefix-cache hits and preemption, and a speculation that
was actually used (proposals kept), or the equality would prove nothing; sampled answers keep their
distribution. Served with tensor parallelism (and /metrics): `test_tensor_parallel`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_compiled import chats
from test_engine import data_url

from levante.cli import main
from levante.engine import EngineConfig, SamplingParams
from levante.engine.engine import Engine
from levante.engine.grammar import json_schema_grammar
from levante.engine.sampler import Sample
from levante.engine.speculative import NgramIndex, SpeculativeConfig
from levante.errors import LevanteError
from levante.loader import LoadedModel, demo_model_path, load
from levante.tokenizer import PromptInputs

CODE = '''def total(items):
    """Sum of price times quantity over the items."""
    result = 0
    for item in items:
        result += item["price"] * item["quantity"]
    return result
'''
COPYING = [
    "Return this function unchanged, then explain it in one line:\n" + CODE,
    "Extract the line items as JSON with fields name, qty and price:\n"
    "Widget A, 3 units, $4.50\nWidget B, 10 units, $1.25\nGadget C, 1 unit, $99.00",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the dog.",
    "Translate to French, keeping the code as it is: run `pip install levante` and then `levante serve`.",
    "Write the numbers from one to twenty in words, separated by commas.",
    "Tell me a short story about a lighthouse keeper.",
]
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=2)


def test_lookup_takes_the_longest_suffix_seen_before_and_its_latest_occurrence() -> None:
    index = NgramIndex(2, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    assert index.propose(tokens, 4) == [7, 5, 2, 3]  # "2 3" last ended before 7 (not the first 2 3 9)
    tokens += [8, 1, 2, 3]
    assert index.propose(tokens, 2) == [7, 5]  # "1 2 3" (length 3) beats "2 3" ending before 8
    assert index.propose([4, 5, 6], 3) == []  # (a fresh sequence's index would be empty: no repeat)
    assert NgramIndex(2, 4).propose([5, 6, 1, 5, 6], 9) == [1, 5, 6]  # at most what follows


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ('{"method": "eagle", "model": "x"}', "method 'eagle' is not supported"),
        ('{"method": "draft_model"}', "model \\(a path\\) goes with method draft_model"),
        ('{"method": "ngram", "model": "x"}', "model \\(a path\\) goes with method draft_model"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be a positive"),
        ('{"num_speculative_tokens": true}', "num_speculative_tokens must be a positive"),
        ('{"prompt_lookup_min": 5, "prompt_lookup_max": 3}', "prompt_lookup_min must not exceed"),
        ('{"ngram_size": 3}', "unknown field 'ngram_size'"),
        ("[4]", "expected a JSON object"),
        ("{method: ngram}", "not JSON"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(value: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_the_cli_names_the_bad_field(capsys: pytest.CaptureFixture[str]) -> None:
    flag = '{"method": "ngram", "num_speculative_tokens": -2}'
    assert main(["generate", "--prompt", "hello", "--speculative-config", flag]) == 1
    assert "--speculative-config: speculative config: num_speculative_tokens must be a positive" in (
        capsys.readouterr().err
    )


def params(i: int) -> SamplingParams:
    """Greedy, 12 to 60 tokens; every fifth with a stop string, every fourth logprobs, every sixth
    n = 2, every seventh bound to a JSON schema (never speculated, running beside those that are)."""
    if i % 7 == 6:
        schema = {"type": "object", "properties": {"name": {"type": "string"}}}
        return SamplingParams(temperature=0, max_tokens=30, grammar=json_schema_grammar(schema))
    return SamplingParams(
        temperature=0,
        max_tokens=12 + (7 * i) % 49,
        stop=["lazy"] if i % 5 == 0 else [],
        logprobs=2 if i % 4 == 1 else None,
        n=2 if i % 6 == 3 else 1,
    )


def run(engine: Engine, inputs: list[PromptInputs], first: int = 0) -> dict[tuple[int, int], list]:
    """Per (request, choice): its (token, logprob and top logprobs) in order, its text, how it ended;
    the requests numbered from `first` (which decides their parameters)."""
    got: dict[tuple[int, int], list] = {}
    for i, prompt in enumerate(inputs, first):
        engine.add_request(str(i), prompt, params(i))
    while engine.has_unfinished():
        for out in engine.step():
            entry = got.setdefault((int(out.request_id), out.index), [[], "", None])
            logprobs = out.logprobs or [None] * len(out.token_ids)
            entry[0] += [
                (t, None if s is None or math.isnan(s.logprob) else (s.logprob, s.top_logprobs))
                for t, s in zip(out.token_ids, logprobs, strict=True)
            ]
            entry[1] += out.text
            entry[2] = entry[2] or out.finish_reason
    return got


def engine(loaded: LoadedModel, speculative: SpeculativeConfig | None, **config: object) -> Engine:
    settings = dict(kv_cache_memory=0.05, max_num_seqs=8, max_num_batched_tokens=256, speculative=speculative)
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(**{**settings, **config}))  # type: ignore[arg-type]


def copying_chats(loaded: LoadedModel) -> list[PromptInputs]:
    """The copy-heavy prompts, each again behind a system prompt (prefix-cache hits on the second
    round of the same user turn), 32 in all."""
    out = []
    for i in range(32):
        messages = [{"role": "user", "content": COPYING[i % len(COPYING)]}]
        if i >= len(COPYING) and i % 2:
            messages.insert(0, {"role": "system", "content": "You are careful and exact."})
        out.append(loaded.tokenizer.encode_chat(messages))
    return out


def test_greedy_answers_are_the_same_with_speculation_on_the_demo_model() -> None:
    loaded = load(demo_model_path(), dtype="bfloat16", progress=False)
    inputs = copying_chats(loaded)
    plain = run(engine(loaded, None), inputs)
    spec = engine(loaded, SPEC)
    assert run(spec, inputs) == plain
    stats = spec.stats
    assert stats.spec_accepted_tokens > 40 and stats.spec_draft_tokens > stats.spec_accepted_tokens
    assert spec.blocks.prefix_hits > 0  # repeated prompts were served from the cache meanwhile
    assert any(e[2] == "stop" for e in plain.values()) and any(e[0][0][1] for e in plain.values())
    assert (3, 1) in plain  # n = 2

    # bound to a JSON schema: each proposal checked against the grammar where the kept ones took it
    items = {"type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}}}
    schema = {"type": "array", "items": {**items, "required": ["name", "qty"]}}
    bound = SamplingParams(temperature=0, max_tokens=80, grammar=json_schema_grammar(schema))
    answers = []
    for e in (engine(loaded, None), engine(loaded, SPEC)):
        e.add_request("json", inputs[1], bound)
        answers.append([t for _ in iter(e.has_unfinished, False) for out in e.step() for t in out.token_ids])
    assert answers[0] == answers[1] and e.stats.spec_accepted_tokens > 5


def test_greedy_answers_are_the_same_with_speculation_on_a_tiny_mistral3_with_images(
    tiny_mistral: Path,
) -> None:
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    inputs = chats(loaded, images=True)
    inputs.append(
        loaded.tokenizer.encode_chat(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(64, 48, 7)}},
                        {"type": "text", "text": COPYING[0]},
                    ],
                }
            ]
        )
    )
    plain = run(engine(loaded, None), inputs)
    spec = engine(loaded, SPEC)
    assert run(spec, inputs) == plain
    assert spec.stats.spec_accepted_tokens > 0

    # preempted and recomputed mid-answer, with proposals in flight
    small = engine(loaded, SPEC, kv_cache_memory=_gib(loaded, 400), max_num_batched_tokens=128)
    first = len(inputs) - 12  # the last twelve, the copying chat among them
    assert run(small, inputs[first:], first) == {key: v for key, v in plain.items() if key[0] >= first}
    assert small.stats.preemptions > 0 and small.stats.spec_accepted_tokens > 0


def test_a_busy_batch_decodes_plainly(tiny_mistral: Path) -> None:
    """More running sequences than disable_by_batch_size: no proposals until the batch thins out
    (the same requests, allowed to speculate at any size, propose in many more steps)."""
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    inputs = chats(loaded, images=False)[:12]
    busy = engine(loaded, SpeculativeConfig(disable_by_batch_size=2), max_num_seqs=12)
    free = engine(loaded, SpeculativeConfig(disable_by_batch_size=12), max_num_seqs=12)
    plain = run(engine(loaded, None, max_num_seqs=12), inputs)
    assert run(busy, inputs) == plain == run(free, inputs)
    assert 2 * busy.stats.spec_drafts < free.stats.spec_drafts, (busy.stats, free.stats)


def _gib(loaded: LoadedModel, tokens: int) -> float:
    text = loaded.config.text
    element = loaded.model.decoder.norm.weight.element_size()
    return tokens * 2 * text.num_layers * text.num_kv_heads * text.head_dim * element / (1 << 30)


CHI2_0_001 = {
    **{1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88},
    **{10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25, 17: 40.79},
    **{18: 42.31, 19: 43.82, 20: 45.31, 21: 46.80, 22: 48.27, 23: 49.73, 24: 51.18, 25: 52.62, 26: 54.05},
}
"""The chi-square distribution's 99.9th percentile by degrees of freedom (a standard table)."""


def homogeneity(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> tuple[float, int]:
    """Pearson's chi-square statistic for "a and b come from one distribution", over the outcomes
    (those expected fewer than 5 times in either sample pooled into one cell), and its degrees of
    freedom."""
    counts = {o: (a.count(o), b.count(o)) for o in set(a) | set(b)}
    cells, rest = [], [0, 0]
    for x, y in counts.values():
        if (x + y) * min(len(a), len(b)) / (len(a) + len(b)) >= 5:
            cells.append((x, y))
        else:
            rest = [rest[0] + x, rest[1] + y]
    cells += [tuple(rest)] if sum(rest) else []
    total = len(a) + len(b)
    stat = 0.0
    for x, y in cells:
        for observed, size in ((x, len(a)), (y, len(b))):
            expected = (x + y) * size / total
            stat += (observed - expected) ** 2 / expected
    return stat, len(cells) - 1


def test_sampled_answers_keep_the_model_distribution(
    tiny_mistral: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first three tokens of 500 sampled answers, kept to three tokens by a logit bias (27
    outcomes, the model's own odds among them), after a prompt of those tokens in every order, so
    that every step checks proposals: with speculation they follow the distribution they follow
    without (Pearson's chi-square at the 0.001 level); with a wrong rule — every proposal kept —
    the same test tells them apart."""
    import random

    import levante.engine.engine as engine_module

    loaded = load(tiny_mistral, dtype="float32", progress=False)
    a, b, c = 1000, 1001, 1002
    prompt = PromptInputs([1, a, b, c, a, c, b, a, a, b, b, c, c, a, c])
    params_ = SamplingParams(
        temperature=1.0, max_tokens=3, ignore_eos=True, logit_bias={a: 100.0, b: 100.0, c: 100.0}
    )
    spec = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=2)

    def answers(speculative: SpeculativeConfig | None) -> tuple[list[tuple[int, ...]], Engine]:
        random.seed(1)  # the unseeded requests' generators are seeded from `random`
        e = engine(loaded, speculative, max_num_seqs=8)
        for i in range(500):
            e.add_request(str(i), prompt, params_)
        got: dict[str, list[int]] = {str(i): [] for i in range(500)}
        while e.has_unfinished():
            for out in e.step():
                got[out.request_id] += out.token_ids
        return [tuple(t) for t in got.values()], e

    without, _ = answers(None)
    assert {t for answer in without for t in answer} == {a, b, c}  # no outcome is (nearly) certain
    with_spec, used = answers(spec)
    assert used.stats.spec_draft_tokens >= 500 and used.stats.spec_accepted_tokens > 100
    stat, df = homogeneity(without, with_spec)
    assert df >= 8 and stat < CHI2_0_001[df], (stat, df)

    def keep_every_proposal(logits: torch.Tensor, row: object, proposal: int) -> tuple[Sample, bool]:
        return Sample(proposal, math.nan, []), True

    monkeypatch.setattr(engine_module, "check", keep_every_proposal)
    wrong, _ = answers(spec)
    stat, df = homogeneity(without, wrong)
    assert stat > CHI2_0_001[df], (stat, df)


def run_greedy(e: Engine, tokens: list[int], count: int) -> list[int]:
    e.add_request(
        "greedy", PromptInputs(tokens), SamplingParams(temperature=0, max_tokens=count, ignore_eos=True)
    )
    out: list[int] = []
    while e.has_unfinished():
        for delta in e.step():
            out += delta.token_ids
    return out


def test_the_rejection_rule_keeps_every_sampling_setting() -> None:
    """At the sampler: with temperature, top-k, top-p and min-p together, tokens drawn through
    `check` (a proposal kept or replaced) follow the distribution plain draws follow."""
    from levante.engine.sampler import SampleRow, check, sample

    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 3
    params_ = SamplingParams(temperature=0.8, top_k=40, top_p=0.85, min_p=0.02, seed=0)
    generator = torch.Generator().manual_seed(5)
    row = SampleRow(params_, [], [], generator, frozenset())
    plain = [(sample(logits, [row])[0].token,) for _ in range(6000)]
    likely = max(set(plain), key=plain.count)[0]
    checked = [(check(logits, row, likely)[0].token,) for _ in range(6000)]
    stat, df = homogeneity(plain, checked)
    assert df >= 5 and stat < CHI2_0_001[df], (stat, df)
    outside = int(logits[0].argmin())  # a token the settings rule out is never kept
    assert all(check(logits, row, outside)[0].token != outside for _ in range(200))


def test_a_draft_model_gives_the_same_greedy_answers(tiny_mistral: Path, tiny_long_context: Path) -> None:
    """A draft with the target's tokenizer: a text-only tiny Mistral of other weights (its guesses
    mostly refused) and the target itself (mostly kept) — both leave the greedy answers as they
    were, images, stops, logprobs, n = 2 and grammars included; a draft with another tokenizer is
    refused naming the field."""
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    inputs = chats(loaded, images=True)[:16]
    plain = run(engine(loaded, None), inputs)
    for draft, most_kept in ((tiny_long_context, False), (tiny_mistral, True)):
        config = SpeculativeConfig(method="draft_model", model=str(draft), num_speculative_tokens=3)
        spec = engine(loaded, config)
        assert run(spec, inputs) == plain
        stats = spec.stats
        assert stats.spec_draft_tokens > 50
        assert (stats.spec_accepted_tokens > stats.spec_draft_tokens / 2) == most_kept, stats
        assert spec.draft is not None and not spec.draft.shadows  # every finished sequence's cache freed
    other = SpeculativeConfig(method="draft_model", model=str(demo_model_path()))
    with pytest.raises(LevanteError, match=r"model: .*tokenizer is not the target model's"):
        engine(loaded, other)
