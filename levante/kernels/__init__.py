"""Levante's CPU operators (`torch.ops.levante.linear`, `quant_linear`, `rms_norm`, `paged_attention`,
`write_kv`, `fused_step`, `argmax`), compiled from `csrc/` at first use and registered with
torch.library (with fake implementations, so torch.compile traces through them).

The build is keyed by the instruction set it targets, so a cache shared between machines never
hands one CPU another's code: the machine's own (`-march=native`, keyed by its CPU flags), or a
narrower one forced the way ATen and oneDNN are forced (`ATEN_CPU_CAPABILITY=avx2|default`,
`ONEDNN_MAX_CPU_ISA=AVX512_CORE` for AVX-512 without BF16, `AVX512_CORE_BF16` without AMX), which
is how the test suite runs every ISA's code path on one machine. Where no compiler is there, the
engine falls back to library kernels (and is then not batch-invariant)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("levante.kernels")

SOURCES = Path(__file__).parent / "csrc"


def target() -> tuple[str, list[str]]:
    """(name, compiler flags) of the instruction set the kernels are built for."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten == "default":
        return "x86_64", ["-march=x86-64"]
    if aten == "avx2" or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        return "avx2", ["-march=haswell"]
    native, no_amx = ["-march=native"], ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
    name = "native_" + _cpu_key()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn == "AVX512_CORE":
        return name + "_nobf16", [*native, "-mno-avx512bf16", *no_amx]
    if onednn == "AVX512_CORE_BF16":
        return name + "_noamx", [*native, *no_amx]
    return name, native


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


@functools.cache
def load() -> bool:
    """Builds (once per target, cached on disk) and loads the operators; False, logged once, where
    they cannot be built."""
    from torch.utils.cpp_extension import load as build

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCES.iterdir()))).hexdigest()[:10]
    name, flags = target()
    for attempt in (1, 2):
        try:
            build(
                name=f"levante_cpu_{name}_{digest}",
                sources=[str(SOURCES / "kernels.cpp"), str(SOURCES / "quant.cpp")],  # built side by side
                extra_cflags=["-O3", "-fopenmp", *flags],  # at::parallel_for is OpenMP, inline
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            break
        except Exception as exc:  # no compiler, no ninja, no x86 intrinsics: library kernels still work
            if attempt == 1:  # another process may have been writing the library just then: once more
                log.info("loading Levante's CPU kernels failed (%s); trying again", exc)
                time.sleep(2)
                continue
            log.warning("Levante's CPU kernels are unavailable (%s); using library kernels", exc)
            return False
    _register_fakes()
    log.info("CPU kernels built for %s", name)
    return True


def _register_fakes() -> None:
    """Output shapes of the operators for torch.compile, which traces a graph through them without
    running them (the in-place ones need none: they return nothing)."""

    @torch.library.register_fake("levante::linear")
    def _(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("levante::quant_linear")
    def _(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], in_features: int) -> torch.Tensor:
        rows = sum(b.shape[0] * 16 if b.dim() == 3 else b.shape[0] for b in blocks)  # dim 3: pack_quant's
        return x.new_empty(x.shape[0], rows)

    @torch.library.register_fake("levante::rms_norm")
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` [N, K] in the layout `linear` reads fastest: AMX tiles for bfloat16 where
    the CPU has them, else each four rows interleaved in the order a tile reads them (one stream
    for the hardware prefetcher). The same products in the same order: the same bits."""
    return torch.ops.levante.pack_linear(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """x·weightᵀ with a summation order fixed per output element (see csrc/linear.cpp); `weight`
    as given or packed by `pack` (then `out_features` is required)."""
    return torch.ops.levante.linear(x, weight, weight.shape[0] if out_features is None else out_features)


def quant_linear(
    x: torch.Tensor, blocks: list[torch.Tensor], qtypes: list[int], in_features: int
) -> torch.Tensor:
    """x·wᵀ where w [N, in_features] is the rows of `blocks` stacked, each GGUF blocks of its ggml
    type in `qtypes` ([rows, bytes per row] uint8, or as `pack_quant` lays them), by integer dot
    products with x rounded to int8 per 32 values (llama.cpp's arithmetic; see csrc/quant.cpp): a
    row's bits depend on it alone."""
    return torch.ops.levante.quant_linear(x, blocks, qtypes, in_features)


def pack_quant(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """GGUF blocks in the layout `quant_linear` reads fastest where this build has one for the type
    (AVX-512; rows a multiple of 16): each word of 16 rows' blocks in one 64-byte line, so decode
    loads what it would otherwise gather row by row. Elsewhere the blocks themselves. The same
    codes and scales either way, so the same bits."""
    if blocks.shape[0] % 16 == 0 and torch.ops.levante.quant_packable(qtype):
        return torch.ops.levante.pack_quant(blocks.contiguous(), qtype)
    return blocks


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of float32 [rows, V], ties to the lowest id, the first NaN above all (as
    torch.argmax), in one call (see csrc/argmax.cpp)."""
    return torch.ops.levante.argmax(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · dtype(x / sqrt(mean(x²) + eps)), x's sum of squares in float32 in an order fixed
    per row (see csrc/norm.cpp): the same bits in any batch."""
    return torch.ops.levante.rms_norm(x, weight, eps)


def dequantize(blocks: torch.Tensor, qtype: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """GGUF blocks [N, bytes per row] → [N, in_features] of `dtype` (float32 or bfloat16), as gguf's
    reference dequantizer and a cast to `dtype` give them."""
    out = torch.empty(blocks.shape[0], in_features, dtype=dtype, device=blocks.device)
    torch.ops.levante.dequantize(blocks, qtype, out)
    return out
