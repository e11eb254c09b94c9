"""One model forward per step over the flat mixed batch (prefill chunks and decode tokens)."""

from __future__ import annotations

import torch

from levante.engine.attention import BatchLayout
from levante.engine.cpu_attention import paged_attention
from levante.engine.kv_cache import KVStore
from levante.engine.sequence import Sequence
from levante.model import Model


class Runner:
    def __init__(self, model: Model, store: KVStore, block_size: int) -> None:
        self.model = model
        self.device = model.decoder.embed_tokens.weight.device
        self.block_size = block_size
        self.attention = paged_attention(store)
        self.image_token_id = model.config.image_token_id if model.vision is not None else None

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
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        images: list[torch.Tensor] = []
        keep: list[int] = []
        prefills: list[tuple[int, int, torch.Tensor | None]] = []
        decode_rows: list[int] = []
        tables: list[list[int]] = []
        lens: list[int] = []
        for i, (seq, n) in enumerate(items):
            start, end = seq.num_computed, seq.num_computed + n
            row = len(ids)
            ids.extend(seq.tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            if n == 1:
                decode_rows.append(row)
                tables.append(seq.block_table)
                lens.append(end)
            else:
                past = self._tensor(self._slots(seq, 0, end)) if start else None
                prefills.append((row, n, past))
            rows = self._image_rows(seq, start, end)
            if rows is not None:
                images.append(rows)
            keep.extend(range(row, row + n) if i in full else [row + n - 1])
        width = max(map(len, tables), default=0)
        self.attention.layout = BatchLayout(
            slots=self._tensor(slots),
            prefills=prefills,
            decode_rows=self._tensor(decode_rows),
            decode_tables=self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width),
            decode_lens=self._tensor(lens),
        )
        hidden = self.model(
            self._tensor(ids), self._tensor(positions), self.attention, torch.cat(images) if images else None
        )
        return self.model.logits(hidden[self._tensor(keep)])

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
