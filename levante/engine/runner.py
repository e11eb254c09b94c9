"""One model forward per step over the flat mixed batch (prefill chunks and decode tokens)."""

from __future__ import annotations

import torch

from levante.engine.attention import BatchLayout, TorchPagedAttention
from levante.engine.kv_cache import KVStore
from levante.engine.sequence import Sequence
from levante.model import Model


class Runner:
    def __init__(self, model: Model, store: KVStore, block_size: int) -> None:
        self.model = model
        self.device = model.decoder.embed_tokens.weight.device
        self.block_size = block_size
        self.attention = TorchPagedAttention(store)
        self.image_token_id = model.config.image_token_id if model.vision is not None else None

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

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

    def _layout(self, items: list[tuple[Sequence, int]], slots: torch.Tensor) -> BatchLayout:
        prefills, rows, tables, lengths = [], [], [], []
        row = 0
        for seq, n in items:
            end = seq.num_computed + n
            if n == 1:
                rows.append(row)
                tables.append(seq.block_table)
                lengths.append(end)
            else:
                past = self._slots(seq, 0, end).to(self.device) if seq.num_computed else None
                prefills.append((row, n, past))
            row += n
        width = max((len(t) for t in tables), default=0)
        padded = torch.zeros((len(tables), width), dtype=torch.long)
        for i, table in enumerate(tables):
            padded[i, : len(table)] = torch.tensor(table)
        pad = (
            torch.arange(width * self.block_size)[None, :] >= torch.tensor(lengths, dtype=torch.long)[:, None]
        )
        return BatchLayout(
            slots=slots.to(self.device),
            prefills=prefills,
            decode_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            decode_tables=padded.to(self.device),
            decode_pad=pad.to(self.device),
        )

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]], full: frozenset[int] = frozenset()) -> torch.Tensor:
        """Feeds each sequence's next `n` tokens; returns float32 logits at each sequence's last fed
        token (rows of sequences still mid-prefill are simply not used), or at every fed token for
        the items whose index is in `full` (prompt logprobs), in item order."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        images: list[torch.Tensor] = []
        keep: list[int] = []
        for i, (seq, n) in enumerate(items):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.tokens[start:end])
            positions.append(torch.arange(start, end))
            slots.append(self._slots(seq, start, end))
            rows = self._image_rows(seq, start, end)
            if rows is not None:
                images.append(rows)
            keep.extend(range(len(ids) - n, len(ids)) if i in full else [len(ids) - 1])
        self.attention.layout = self._layout(items, torch.cat(slots))
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.cat(positions).to(self.device),
            self.attention,
            torch.cat(images) if images else None,
        )
        return self.model.logits(hidden[torch.tensor(keep, device=self.device)])
