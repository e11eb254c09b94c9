"""The weights a step streams, moved into memory the kernel may back with 2 MiB pages: a transform
on a loaded model, applied once by the engine that serves it on CPU.

Each decode token reads every weight once: with 4 KiB pages that is a TLB miss and a page walk
every 64 cache lines, 66,000 walks a token for the demo model's 270 MB. Linux backs an anonymous
range with transparent huge pages where asked to (`madvise(MADV_HUGEPAGE)`, which its default
`enabled=madvise` setting honours), and PyTorch's allocator does not ask. Measured on the demo
model's fused decode step, bfloat16: 9.4–9.95 ms a step on 4 KiB pages, 8.55–8.6 ms on huge pages.
The values are copied as they are: the same bits, only where they live changes.

Tensors are packed 64-byte aligned into arenas of at least 64 MiB, 2 MiB aligned, one tensor at a
time, each original freed as its copy takes its place: the peak is the model plus one arena (pages
of an arena never written are never backed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

PAGE = 2 << 20
ARENA = 64 << 20
SMALLEST = 256 << 10  # smaller tensors (norm weights) stay where they are
MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int], bool] | None:
    """madvise(address, length, MADV_HUGEPAGE) → whether the kernel took it; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def advise(address: int, length: int) -> bool:
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0

    return advise


# every arena block, weakly: a tensor in one is not moved again (an engine built twice over one model).
# A weak reference, not the block's address: a block freed and its address reused by a later model's
# tensor must not make that tensor look moved (it did, in a suite that loads the demo model many times)
_BLOCKS: set[StorageWeakRef] = set()


class Arena:
    """Room for tensors in 2 MiB-aligned memory advised for huge pages, a new block when one fills."""

    def __init__(self, advise: Callable[[int, int], bool]) -> None:
        self.advise = advise
        self.block: torch.Tensor | None = None  # the raw bytes of the block being filled
        self.next = self.end = 0  # its free range

    @staticmethod
    def holds(t: torch.Tensor) -> bool:
        return StorageWeakRef(t.untyped_storage()) in _BLOCKS

    def place(self, t: torch.Tensor) -> torch.Tensor | None:
        """A copy of contiguous `t` in the arena; None where the kernel refused the advice."""
        size = t.numel() * t.element_size()
        if self.block is None or self.next + size > self.end:
            length = max(ARENA, -(-size // PAGE) * PAGE)
            raw = torch.empty(length + PAGE, dtype=torch.uint8)  # not yet touched: no page backed
            start = -raw.data_ptr() % PAGE
            if not self.advise(raw.data_ptr() + start, length):
                return None
            _BLOCKS.difference_update([block for block in _BLOCKS if block.expired()])
            _BLOCKS.add(StorageWeakRef(raw.untyped_storage()))
            self.block, self.next, self.end = raw, start, start + length
        copy = self.block[self.next : self.next + size].view(t.dtype).view(t.shape)
        copy.copy_(t)
        self.next += -(-size // 64) * 64
        return copy


def huge_page_copy(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of contiguous `t` in memory advised for 2 MiB pages, as `use_huge_pages` places
    weights (a benchmark's read of the memory the weights live in); None where it cannot be."""
    advise = _madvise()
    return None if advise is None else Arena(advise).place(t)


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters, buffers and plain tensor attributes (a kernel's packed weight)."""
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)
    yield from ((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))


def use_huge_pages(model: nn.Module) -> int:
    """Moves every contiguous CPU tensor of at least 256 KiB under `model` into huge-page arenas,
    keeping tensors that shared memory (tied embeddings and LM heads) shared; returns the bytes
    moved (0 off Linux, or where the kernel refuses the advice)."""
    advise = _madvise()
    if advise is None:
        return 0
    arena = Arena(advise)
    copies: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    moved = 0
    for module in model.modules():
        for name, t in list(_tensors(module)):
            size = t.numel() * t.element_size()
            if t.device.type != "cpu" or not t.is_contiguous() or size < SMALLEST or arena.holds(t):
                continue
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            if key not in copies:
                copy = arena.place(t)
                if copy is None:
                    return moved
                copies[key], moved = copy, moved + size
            if name in module._parameters:
                module._parameters[name].data = copies[key]  # the Parameter itself stays (tied weights)
            else:
                setattr(module, name, copies[key])
    return moved
