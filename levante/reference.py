"""A simple reference generation loop over a dense per-sequence KV cache.

It is slow on purpose and kept as the oracle that the paged engine is checked against:
one forward per step, no scheduling, no paging."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from levante.model import Model, causal_attention


@dataclass
class DenseKVCache:
    """Reference `AttentionBackend`: every sequence keeps growing K/V tensors per layer.
    Call `plan` before each forward to say which sequences the flat batch holds, in order."""

    num_layers: int
    keys: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    _batch: list[tuple[int, int]] = field(default_factory=list)

    def plan(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        self._batch = list(zip(seq_ids, lengths, strict=True))
        for sid in seq_ids:
            self.keys.setdefault(sid, [None] * self.num_layers)
            self.values.setdefault(sid, [None] * self.num_layers)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for sid, n in self._batch:
            ks, vs = self.keys[sid], self.values[sid]
            new_k, new_v = k[start : start + n], v[start : start + n]
            prev_k, prev_v = ks[layer], vs[layer]
            ks[layer] = new_k if prev_k is None else torch.cat((prev_k, new_k))
            vs[layer] = new_v if prev_v is None else torch.cat((prev_v, new_v))
            out.append(causal_attention(q[start : start + n], ks[layer], vs[layer]))
            start += n
        return torch.cat(out)


def image_embeddings(model: Model, images: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """All `[IMG]` rows for a prompt, concatenated in order (None for a text-only prompt)."""
    if not images:
        return None
    return torch.cat(model.encode_images(list(images)))


@torch.inference_mode()
def generate_tokens(
    model: Model,
    prompt: Sequence[int],
    *,
    images: Sequence[torch.Tensor] = (),
    max_tokens: int = 256,
    stop_ids: frozenset[int] = frozenset(),
    temperature: float = 0.0,
    seed: int | None = None,
) -> Iterator[tuple[int, float]]:
    """Yields (token id, logprob) one at a time: prefill the whole prompt, then decode one token
    per forward. Temperature 0 is greedy. Stops after a stop id (which is yielded) or max_tokens."""
    device = model.decoder.norm.weight.device
    cache = DenseKVCache(len(model.decoder.layers))
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)
    positions = torch.arange(len(prompt), device=device)
    embeds = image_embeddings(model, images)
    for _ in range(max_tokens):
        cache.plan([0], [len(ids)])
        logits = model.logits(model(ids, positions, cache, embeds)[-1])
        logprobs = torch.log_softmax(logits, dim=-1)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        else:
            token = int(logits.argmax())
        yield token, float(logprobs[token])
        if token in stop_ids:
            return
        next_pos = int(positions[-1]) + 1
        ids = torch.tensor([token], device=device)
        positions = torch.tensor([next_pos], device=device)
        embeds = None
