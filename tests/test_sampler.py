"""The sampler against hand-computed cases and seeded statistics; no model needed."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import torch

from levante import kernels
from levante.engine.sampler import SampleRow, _adjusted, _argmax, _blocked_argmax, check_vocab, sample
from levante.engine.sampling_params import SamplingParams


def row(
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    seed: int | None = 0,
    eos: frozenset[int] = frozenset(),
    **params: object,
) -> SampleRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRow(SamplingParams(**params), prompt, output, gen, eos)


def draws(logits: list[float], n: int, **params: object) -> Counter[int]:
    """n seeded draws from one row; the generator carries over between draws."""
    r = row(**params)
    x = torch.tensor([logits])
    return Counter(sample(x, [r])[0].token for _ in range(n))


def chi_square(counts: Counter[int], probs: Sequence[float]) -> float:
    n = sum(counts.values())
    return sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


@pytest.mark.parametrize("vocab", [7, 1024, 1500, 5000])
def test_greedy_is_argmax_with_ties_to_lowest_id(vocab: int) -> None:
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, vocab // 2] = logits[1, vocab - 1] = 50.0  # tie across blocks
    logits[2, 3] = logits[2, 5] = 50.0  # tie inside one block
    logits[3, vocab - 1] = 50.0  # in the ragged last block
    got = [s.token for s in sample(logits, [row(temperature=0.0) for _ in range(6)])]
    assert got == logits.argmax(-1).tolist()
    assert got[1:4] == [vocab // 2, 3, vocab - 1]


@pytest.mark.parametrize("vocab", [1, 7, 16, 1024, 1500, 49152])
@pytest.mark.parametrize("argmax", [_argmax, _blocked_argmax], ids=["kernel", "blocked"])
def test_both_argmaxes_answer_as_torch_does(
    vocab: int, argmax: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Ties to the lowest id, NaN above everything (its first), a row of -inf its first id, rows at a
    stride: Levante's kernel (CPU) and the blocked fallback (elsewhere) against torch.argmax."""
    assert kernels.load()
    x = torch.randn(8, vocab + 3, generator=torch.Generator().manual_seed(vocab))[:, :vocab]
    x[1, vocab // 2] = x[1, vocab - 1] = 50.0
    x[2, -1] = 60.0
    x[3, vocab - 1] = math.nan
    x[4, vocab // 3] = math.nan
    x[4, 0] = math.inf
    x[5] = -math.inf
    x[6, vocab // 2] = math.inf
    assert argmax(x).tolist() == x.argmax(-1).tolist()
    assert argmax(x[:1]).tolist() == x[:1].argmax(-1).tolist()


def test_the_argmax_kernel_refuses_what_it_cannot_read() -> None:
    """The sampler hands it float32 rows only; anything else is refused by name, not misread."""
    assert kernels.load()
    for bad in (torch.zeros(2, 5, dtype=torch.bfloat16), torch.zeros(5), torch.zeros(5, 2).T):
        with pytest.raises(RuntimeError, match=r"levante::argmax: float32 \[rows, V\] with V contiguous"):
            kernels.argmax(bad)


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    best = int(logits[0].argmax())
    rows = [row(temperature=0.0, logit_bias={17: 100.0}), row(temperature=1.0, logit_bias={17: 100.0})]
    assert [s.token for s in sample(logits, rows)] == [17, 17]
    banned = sample(logits[:1], [row(temperature=0.0, logit_bias={best: -100.0})])[0].token
    assert banned == int(logits[0].topk(2).indices[1])


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output() -> None:
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0, 1.5])
    got = _adjusted(logits, row(prompt=[0, 0, 1], output=[2, 0], repetition_penalty=2.0))
    assert got.tolist() == [1.0, -2.0, 0.0, 3.0, 1.5]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([2.0, 2.0, 2.0, 2.0])
    r = row(prompt=[3, 3, 3], output=[0, 1, 1, 1], presence_penalty=0.5, frequency_penalty=0.25)
    assert _adjusted(logits, r).tolist() == [2.0 - 0.5 - 0.25, 2.0 - 0.5 - 0.75, 2.0, 2.0]


def test_adjustments_apply_in_order_bias_repetition_presence() -> None:
    # bias first makes token 0 positive, so the penalty divides it: (-1 + 4) / 2 - 1, not (-1 * 2 + 4) - 1
    r = row(output=[0], logit_bias={0: 4.0}, repetition_penalty=2.0, presence_penalty=1.0)
    assert _adjusted(torch.tensor([-1.0, 0.0]), r).tolist() == [0.5, 0.0]


def test_penalties_steer_the_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    assert sample(logits, [row(prompt=[0], temperature=0.0, repetition_penalty=1.5)])[0].token == 1
    assert sample(logits, [row(prompt=[0], temperature=0.0, presence_penalty=2.0)])[0].token == 0
    assert sample(logits, [row(output=[0, 0], temperature=0.0, frequency_penalty=0.3)])[0].token == 1


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.5]])
    for ignore_eos in (False, True):
        early = dict(eos=frozenset({0}), stop_token_ids=(1,), min_tokens=2, ignore_eos=ignore_eos)
        assert sample(logits, [row(output=[3], temperature=0.0, **early)])[0].token == 2
        assert sample(logits, [row(output=[3, 3], temperature=0.0, **early)])[0].token == 0
        assert set(draws([9.0, 8.0, 1.0, 0.5], 200, output=[3], **early)) <= {2, 3}


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(8, 2000, generator=torch.Generator().manual_seed(3)) * 0.1
    rows = [row(seed=i, temperature=1.5, top_k=1) for i in range(8)]
    assert [s.token for s in sample(logits, rows)] == logits.argmax(-1).tolist()


PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_p": 0.7}, {0, 1}),  # token 2 has 0.8 of the mass above it
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"top_k": 3, "top_p": 0.9}, {0, 1, 2}),  # of the top-3 mass, 0.8/0.95 lies above token 2
        ({"top_k": 3, "top_p": 0.8}, {0, 1}),
        ({"top_k": 2}, {0, 1}),
        ({"min_p": 0.5}, {0, 1}),  # keeps p >= 0.25
        ({"min_p": 0.4, "top_p": 0.85}, {0, 1}),
        ({"min_p": 1.0}, {0}),
    ],
)
def test_filters_never_leave_the_allowed_set(params: dict[str, float], allowed: set[int]) -> None:
    got = draws(LOGITS, 600, temperature=1.0, **params)
    assert set(got) == allowed
    mass = sum(PROBS[i] for i in allowed)
    assert chi_square(got, [PROBS[i] / mass if i in allowed else 0.0 for i in range(4)]) < 25


def test_top_p_over_a_wide_vocabulary() -> None:
    logits = torch.randn(1, 3000, generator=torch.Generator().manual_seed(4))
    order = logits[0].softmax(-1).sort(descending=True)
    mass_above = order.values.cumsum(0) - order.values
    nucleus = set(order.indices[mass_above < 0.3].tolist())
    r = row(seed=5, temperature=1.0, top_p=0.3)
    got = {sample(logits, [r])[0].token for _ in range(400)}
    assert got <= nucleus and len(got) > len(nucleus) // 2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution(temperature: float) -> None:
    scaled = [p ** (1 / temperature) for p in PROBS]
    expected = [s / sum(scaled) for s in scaled]
    # 3 degrees of freedom: 25 is beyond p = 1e-4, yet far below what a wrong temperature gives
    assert chi_square(draws(LOGITS, 4000, temperature=temperature), expected) < 25


def test_draws_reach_every_block_of_a_wide_row() -> None:
    logits = torch.full((3001,), -30.0)
    logits[[5, 1500, 3000]] = 0.0
    got = draws(logits.tolist(), 1500, temperature=1.0)
    assert set(got) == {5, 1500, 3000}
    assert chi_square(Counter({i: got[t] for i, t in enumerate([5, 1500, 3000])}), [1 / 3] * 3) < 25


def test_seeded_row_gives_the_same_tokens_alone_and_in_any_batch() -> None:
    vocab, steps = 5000, 12
    gen = torch.Generator().manual_seed(6)
    own = torch.randn(steps, vocab, generator=gen) * 2
    crowd = torch.randn(steps, 16, vocab, generator=gen) * 2
    seeded = {"temperature": 0.8, "top_p": 0.9, "min_p": 0.01, "presence_penalty": 0.3}
    others: list[dict[str, object]] = [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 20},
        {"temperature": 1.2, "top_p": 0.5, "repetition_penalty": 1.3},
        {"temperature": 0.0, "logit_bias": {3: 5.0}},
        {"temperature": 0.9, "min_p": 0.1, "logprobs": 3},
    ]

    def run(position: int, batch: int) -> list[int]:
        history: list[int] = []
        rows = [row([1, 2], history, seed=100 + i, **others[i % len(others)]) for i in range(batch)]
        rows[position] = row([1, 2], history, seed=42, **seeded)
        for step in range(steps):
            logits = crowd[step, :batch].clone()
            logits[position] = own[step]
            history.append(sample(logits, rows)[position].token)
        return history

    alone = run(0, 1)
    assert len(set(alone)) > 1
    assert run(0, 16) == alone
    assert run(9, 16) == alone
    assert run(15, 16) == alone


def test_logprobs_are_raw_log_softmax_and_top_logprobs_sorted() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    rows = [
        row(temperature=0.0, logprobs=5, logit_bias={9: 50.0}),
        row(temperature=0.7, top_k=10, logprobs=0, repetition_penalty=1.5, prompt=[1]),
        row(temperature=1.0),
    ]
    samples = sample(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    for i, s in enumerate(samples[:2]):
        assert s.logprob == pytest.approx(float(raw[i, s.token]), abs=1e-5)
    assert math.isnan(samples[2].logprob)  # not asked for: no pass over the vocabulary for it
    assert samples[0].token == 9
    top = raw[0].topk(5)
    assert [t for t, _ in samples[0].top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in samples[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert samples[1].top_logprobs == [] and samples[2].top_logprobs == []


def test_invalid_vocabulary_inputs_name_the_field() -> None:
    check_vocab(SamplingParams(logit_bias={0: 1.0, 99: -1.0}, stop_token_ids=(5,)), 100)
    with pytest.raises(ValueError, match="logit_bias"):
        check_vocab(SamplingParams(logit_bias={100: 1.0}), 100)
    with pytest.raises(ValueError, match="logit_bias"):
        check_vocab(SamplingParams(logit_bias={-1: 1.0}), 100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        check_vocab(SamplingParams(stop_token_ids=(3, 250)), 100)


def test_logits_must_match_the_rows() -> None:
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 10), [row()])
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(1, 10, dtype=torch.float64), [row()])
