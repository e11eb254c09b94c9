"""Batched sampling where every row carries its own parameters.

Per-step cost matters (64+ rows, V up to 131,072, a 2-core CPU), so each row pays only for what it
asked for: rows without bias, penalties or min_tokens are never copied, greedy rows share one
batched argmax, and only random rows touch temperature, top-k/top-p/min-p and a generator.
Random rows are drawn one at a time from their own generator with one uniform number, so a seeded
request gives the same tokens alone or in any batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from levante import kernels
from levante.engine.sampling_params import SamplingParams

_BLOCK = 1024  # argmax and draw work in two levels: vectorised over blocks, then inside one block
_CHUNK = 1 << 21  # elements per log_softmax call (8 MB)
_LOG2E = math.log2(math.e)


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: Sequence[int]  # repetition_penalty looks at prompt + output (HF/vLLM semantics)
    output_ids: Sequence[int]  # presence/frequency penalties (output only, as OpenAI), min_tokens
    generator: torch.Generator | None  # the request's own; used iff temperature > 0
    eos_ids: frozenset[int]  # with stop_token_ids, masked while len(output_ids) < min_tokens
    allowed: torch.Tensor | None = None  # bool [V] from a grammar: every other token is masked last


@dataclass
class Sample:
    token: int
    # under the raw model distribution (before bias, penalties, temperature), as vLLM; NaN unless the
    # request asked for logprobs
    logprob: float
    top_logprobs: list[tuple[int, float]]  # params.logprobs most likely raw tokens, most likely first


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Rejects token ids the model cannot produce; call at admission, since inside a batch an
    out-of-range id would fail the whole step (and a negative one would silently wrap)."""
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sample]:
    """One token per row of `logits` [B, V] (float32, left unmodified). Token ids in the params must
    have passed `check_vocab`."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be float32 [{len(rows)}, V], got {logits.dtype} {list(logits.shape)}")
    adjusts = [_adjusts(row) for row in rows]
    plain_greedy = any(row.params.greedy and not adj for row, adj in zip(rows, adjusts, strict=True))
    batch_argmax = _argmax(logits).tolist() if plain_greedy else []
    tokens: list[int] = []
    for i, (row, adj) in enumerate(zip(rows, adjusts, strict=True)):
        if row.params.greedy and not adj:
            tokens.append(batch_argmax[i])
            continue
        x = _adjusted(logits[i], row) if adj else logits[i]
        tokens.append(int(_argmax(x[None])[0]) if row.params.greedy else _draw(x, row))
    # log-probabilities only for the rows that asked (a pass over the vocabulary per row otherwise)
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    scored: dict[int, tuple[float, list[tuple[int, float]]]] = {}
    if asked:  # none asked: not even the empty tensors (a tenth of a millisecond a step, alone)
        found = raw_logprobs(
            logits[asked], [tokens[i] for i in asked], [rows[i].params.logprobs or 0 for i in asked]
        )
        scored = dict(zip(asked, found, strict=True))
    return [Sample(tok, *scored.get(i, (math.nan, []))) for i, tok in enumerate(tokens)]


def _adjusts(row: SampleRow) -> bool:
    p = row.params
    return bool(
        p.logit_bias
        or p.repetition_penalty != 1.0
        or (row.output_ids and (p.presence_penalty or p.frequency_penalty))
        or (len(row.output_ids) < p.min_tokens and (row.eos_ids or p.stop_token_ids))
        or row.allowed is not None
    )


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    # numpy converts a list of ints ~5x faster than torch.tensor does
    return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)


def _adjusted(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """A copy of one row's logits after bias and penalties, then the grammar mask (last, so nothing
    can push a token it forbids) or else min_tokens masking."""
    p, x = row.params, logits.clone()
    if p.logit_bias:
        bias = torch.tensor(list(p.logit_bias.values()), dtype=x.dtype, device=x.device)
        x[_ids(list(p.logit_bias), x.device)] += bias
    if p.repetition_penalty != 1.0:
        # duplicates are harmless: every write of a token carries the same value
        seen = torch.cat([_ids(row.prompt_ids, x.device), _ids(row.output_ids, x.device)])
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if row.output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.unique(_ids(row.output_ids, x.device), return_counts=True)
        x[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(x.dtype)
    if row.allowed is not None:  # the grammar decides where the answer may end, not min_tokens
        x.masked_fill_(~row.allowed.to(x.device), -math.inf)
    elif len(row.output_ids) < p.min_tokens and (row.eos_ids or p.stop_token_ids):
        x[_ids(sorted({*row.eos_ids, *p.stop_token_ids}), x.device)] = -math.inf
    return x


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, ties to the lowest id, the first NaN above all (torch.argmax's answer): on
    CPU Levante's kernel, one call (a decode step's greedy token in ~12 µs); elsewhere blocked."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and kernels.load():
        return kernels.argmax(x if x.stride(-1) == 1 else x.contiguous())
    return _blocked_argmax(x)


def _blocked_argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax is a scalar loop on CPU; a vectorised max per block, then argmax inside the
    first winning block only, is several times faster."""
    n, v = x.shape
    full = v - v % _BLOCK
    block_max = [x[:, :full].reshape(n, -1, _BLOCK).amax(-1)] if full else []
    if full < v:
        block_max.append(x[:, full:].amax(-1, keepdim=True))
    block = torch.cat(block_max, 1).argmax(-1)
    # clamping repeats the last column after itself, so the first maximum keeps its place
    cols = (block[:, None] * _BLOCK + torch.arange(_BLOCK, device=x.device)).clamp_(max=v - 1)
    return cols.gather(1, x.gather(1, cols).argmax(-1, keepdim=True))[:, 0]


def raw_logprobs(
    logits: torch.Tensor, tokens: list[int], wanted: list[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row, the chosen token's log-probability under the raw logits and the `wanted` most likely
    tokens'. One fused log_softmax per chunk of rows (faster than logsumexp): a chunk stays in cache,
    while results much over 8 MB were measured to come back as fresh, page-faulting memory every step."""
    step = max(1, _CHUNK // logits.shape[1])
    chosen = torch.tensor(tokens, device=logits.device)[:, None]
    out: list[tuple[float, list[tuple[int, float]]]] = []
    for start in range(0, len(tokens), step):
        logprobs = torch.log_softmax(logits[start : start + step], -1)
        picked = logprobs.gather(1, chosen[start : start + step])[:, 0].tolist()
        for i, (row, lp) in enumerate(zip(logprobs, picked, strict=True), start):
            top: list[tuple[int, float]] = []
            if wanted[i]:
                values, ids = row.topk(min(wanted[i], row.shape[0]))
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out.append((lp, top))
    return out


def _draw(x: torch.Tensor, row: SampleRow) -> int:
    """One token from one row: temperature, then top-k, top-p (of the top-k mass), min-p.

    Work is per row on purpose: batch-shaped kernels may split a row differently as the batch size
    changes, which could move a seeded draw. top-p keeps every token with less than top_p of the mass
    strictly above it, and is applied by rejection instead of a sort: draw, and if the token lies
    outside the nucleus, so does everything no more likely than it, so discard those and redraw. The
    first draw is accepted with probability >= top_p, so this costs about one plain draw."""
    p, v = row.params, x.shape[0]
    ids: torch.Tensor | None = None
    if 0 < p.top_k < v:
        x, ids = x.topk(p.top_k)
    # exp2 is ~3x faster than exp here; weights are ∝ softmax(x / T) and the best is exactly 1
    weights = torch.sub(x, x.max()).mul_(_LOG2E / p.temperature).exp2_()
    allowed = weights if p.min_p == 0.0 else torch.where(weights >= p.min_p, weights, 0.0)
    nucleus_mass = p.top_p * float(weights.sum()) if p.top_p < 1.0 else None
    while True:
        i = _pick(allowed, row.generator)
        if nucleus_mass is None or float(F.threshold(weights, float(weights[i]), 0.0).sum()) < nucleus_mass:
            return int(ids[i]) if ids is not None else i
        allowed = F.threshold(allowed, float(weights[i]), 0.0)


def check(logits: torch.Tensor, row: SampleRow, proposal: int) -> tuple[Sample, bool]:
    """A random row's token given a proposed one, keeping the row's distribution exactly (the
    rejection rule of speculative sampling, for a proposal that is a single guess): the proposal is
    kept with its probability p under the row's distribution, else a token is drawn from the
    distribution without it. `logits` is [1, V]; returns the token and whether it is the proposal."""
    x = _adjusted(logits[0], row) if _adjusts(row) else logits[0]
    p = _distribution(x, row)
    u = float(torch.rand((), dtype=torch.float64, generator=row.generator, device=x.device))
    kept = u < float(p[proposal])
    if kept:
        token = proposal
    else:
        p[proposal] = 0.0
        token = _pick(p, row.generator)
    lp, top = (
        raw_logprobs(logits, [token], [row.params.logprobs or 0])[0]
        if row.params.logprobs is not None
        else (math.nan, [])
    )
    return Sample(token, lp, top), kept


def _distribution(x: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """The probabilities `_draw` samples with, over the whole vocabulary (float64): temperature,
    top-k, min-p, and the top-p nucleus (tokens with less than top_p of the mass strictly above)."""
    p, v = row.params, x.shape[0]
    ids: torch.Tensor | None = None
    if 0 < p.top_k < v:
        x, ids = x.topk(p.top_k)
    weights = torch.sub(x, x.max()).mul_(_LOG2E / p.temperature).exp2_().double()
    allowed = weights if p.min_p == 0.0 else torch.where(weights >= p.min_p, weights, 0.0)
    if p.top_p < 1.0:
        ordered = weights.sort(descending=True).values
        above = torch.searchsorted(-ordered, -weights)  # how many weigh strictly more
        mass = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])[above]
        allowed = torch.where(mass < p.top_p * weights.sum(), allowed, 0.0)
    probs = allowed / allowed.sum()
    if ids is None:
        return probs
    return torch.zeros(v, dtype=torch.float64, device=x.device).index_copy_(0, ids, probs)


def _pick(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability ∝ `weights` from one uniform number. A cumsum is sequential, so
    it runs over block sums and then inside the chosen block only, never over the whole row."""
    if weights.shape[0] % _BLOCK:
        weights = F.pad(weights, (0, _BLOCK - weights.shape[0] % _BLOCK))
    blocks = weights.view(-1, _BLOCK)
    cdf = blocks.sum(-1).cumsum(0, dtype=torch.float64)
    u = torch.rand((), dtype=torch.float64, generator=generator, device=weights.device) * cdf[-1]
    b = _first_above(cdf, u)
    return b * _BLOCK + _first_above(blocks[b].cumsum(0, dtype=torch.float64), u - cdf[b - 1] if b else u)


def _first_above(cdf: torch.Tensor, value: torch.Tensor) -> int:
    """The first index whose cdf exceeds `value`: never a zero-weight one, even when rounding puts
    `value` at or past the total."""
    return min(int(torch.searchsorted(cdf, value, right=True)), int(torch.searchsorted(cdf, cdf[-1])))
