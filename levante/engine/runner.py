"""One model forward per step over the flat mixed batch (prefill chunks and decode tokens)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from levante.engine.attention import BatchLayout, CpuPagedAttention, paged_attention
from levante.engine.kv_cache import KVStore
from levante.engine.sequence import Sequence
from levante.model import Model


@dataclass
class Step:
    """One forward's inputs, planned from the scheduled sequences: plain lists (and the image rows)
    that rank 0 of a tensor-parallel group broadcasts so the other ranks run the same forward."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # cache slot of each token
    # (first row, rows, context slots; None: nothing cached before the chunk)
    prefills: list[tuple[int, int, list[int] | None]] = field(default_factory=list)
    paged_rows: list[int] = field(default_factory=list)  # rows attended one by one over their blocks
    paged_seqs: list[int] = field(default_factory=list)  # each one's block table in `tables`
    paged_lens: list[int] = field(default_factory=list)  # each one's context length
    tables: list[list[int]] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)  # rows whose logits are returned
    images: torch.Tensor | None = None  # the batch's [IMG] rows, in order


class Runner:
    """Plans and runs each step's forward. In batch-invariant mode every row, prefill rows too, is
    attended alone over its sequence's blocks by the CPU kernel (and the linear layers run on
    Levante's kernel, see `linears`), so a token's logits do not depend on how its prompt was
    chunked, what was cached, or what else is in the step."""

    def __init__(
        self,
        model: Model,
        store: KVStore,
        block_size: int,
        publish: Callable[[Step], None] | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.publish = publish  # tensor parallelism: sends each step to the other ranks
        self.device = model.decoder.norm.weight.device
        self.block_size = block_size
        self.attention = paged_attention(store)
        self.batch_invariant = batch_invariant and isinstance(self.attention, CpuPagedAttention)
        self.image_token_id = model.config.image_token_id if model.vision is not None else None
        # steps whose rows are all paged and hold no image rows (every decode step; in batch-invariant
        # mode every text step): `forward` itself, or its compiled version (see `compiled`)
        self.paged: Callable[..., torch.Tensor] = self.forward

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _image_rows(self, seq: Sequence, start: int, end: int) -> torch.Tensor | None:
        """The projected `[IMG]` rows that fall in tokens [start, end) of this sequence; the
        images are encoded once, at the first chunk that needs them."""
        if self.image_token_id is None or not seq.images or start >= seq.images[-1].last + 1:
            return None
        tokens = torch.tensor(seq.prompt[: min(end, len(seq.prompt))])
        is_img = tokens == self.image_token_id
        before, inside = int(is_img[:start].sum()), int(is_img[start:].sum())
        if inside == 0:
            return None
        if seq.image_embeds is None:
            with torch.inference_mode():
                pixels = [img.pixels.to(self.device) for img in seq.images]
                seq.image_embeds = torch.cat(self.model.encode_images(pixels))
        return seq.image_embeds[before : before + inside]

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]], full: frozenset[int] = frozenset()) -> torch.Tensor:
        """Feeds each sequence's next `n` tokens; returns float32 logits at each sequence's last fed
        token (rows of sequences still mid-prefill are simply not used), or at every fed token for
        the items whose index is in `full` (prompt logprobs), in item order."""
        step = Step()
        images: list[torch.Tensor] = []
        for i, (seq, n) in enumerate(items):
            start, end = seq.num_computed, seq.num_computed + n
            row = len(step.ids)
            step.ids.extend(seq.tokens[start:end] if end <= len(seq) else (seq.tokens + seq.draft)[start:end])
            step.positions.extend(range(start, end))
            step.slots.extend(self._slots(seq, start, end))
            if n == 1 or self.batch_invariant:
                step.paged_rows.extend(range(row, row + n))
                step.paged_seqs.extend([len(step.tables)] * n)
                step.paged_lens.extend(range(start + 1, end + 1))
                step.tables.append(seq.block_table)
            else:
                step.prefills.append((row, n, self._slots(seq, 0, end) if start else None))
            rows = self._image_rows(seq, start, end)
            if rows is not None:
                images.append(rows)
            step.keep.extend(range(row, row + n) if i in full else [row + n - 1])
        step.images = torch.cat(images) if images else None
        if self.publish is not None:
            self.publish(step)
        return self.execute(step)

    @torch.inference_mode()
    def execute(self, step: Step) -> torch.Tensor:
        """One forward over a planned step: what every tensor-parallel rank runs in lockstep."""
        width = max(map(len, step.tables), default=0)
        tables = [t + [0] * (width - len(t)) for t in step.tables]
        args = (
            self._tensor(step.ids),
            self._tensor(step.positions),
            self._tensor(step.slots),
            self._tensor(step.paged_rows),
            self._tensor(step.paged_seqs),
            self._tensor(tables).view(len(tables), width),
            self._tensor(step.paged_lens),
            self._tensor(step.keep),
        )
        if not step.prefills and step.images is None:
            return self.paged(*args)
        prefills = [(row, n, None if past is None else self._tensor(past)) for row, n, past in step.prefills]
        images = None if step.images is None else step.images.to(self.device)
        return self.forward(*args, prefills, images)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        rows: torch.Tensor,
        seqs: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        keep: torch.Tensor,
        prefills: list[tuple[int, int, torch.Tensor | None]] | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model over one step's tensors (see `BatchLayout`), logits at the `keep` rows."""
        self.attention.layout = BatchLayout(slots, prefills or [], rows, seqs, tables, lens)
        hidden = self.model(ids, positions, self.attention, images)
        return self.model.logits(hidden[keep])

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        # through numpy: half torch.tensor's time on a list, eight times a step
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(self.device)
