"""One sequence's state as it moves through the engine (a request with n > 1 has n of them)."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

import torch

from levante.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """One image of the prompt: the indices of its first and last `[IMG]` token, its preprocessed
    pixels, and a hash of their content (part of the prefix-cache key of the blocks it touches)."""

    first: int
    last: int
    pixels: torch.Tensor
    digest: bytes

    @staticmethod
    def content_hash(pixels: torch.Tensor) -> bytes:
        data = pixels.detach().cpu().contiguous()
        return hashlib.blake2b(
            repr(tuple(data.shape)).encode() + data.numpy().tobytes(), digest_size=16
        ).digest()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    prompt: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when the request was added
    images: list[ImageSpan] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks registered so far
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached: int = 0  # prompt tokens served by the prefix cache (reported as cached_tokens)
    image_embeds: torch.Tensor | None = None  # projected [IMG] rows, kept only while prefilling
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    scheduled_at: float | None = None  # when it first got a place in a batch (queue time ends)
    draft: list[int] = field(default_factory=list)  # tokens proposed after it, checked this step
    spec_proposed: int = 0  # proposals checked over its life, and kept
    spec_accepted: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output if self.output else self.prompt

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_remaining(self) -> int:
        """Tokens still to be fed to the model before the next sample."""
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_images(self, start: int, end: int) -> tuple[bytes, ...]:
        """Content hashes of the images with an `[IMG]` token in token range [start, end)."""
        return tuple(img.digest for img in self.images if img.first < end and img.last >= start)
