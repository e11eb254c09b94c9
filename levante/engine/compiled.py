"""The paged step compiled by torch.compile (Inductor): a transform on a built `Runner`, as the
kernel choice in `linears` is a transform on a built model; the model files know nothing of it.

Eager, a decode step dispatches a dozen small operations per layer from Python (norms, rotary,
SiLU·mul, residual adds, views), which costs as much as the matmuls of a small model. Compiled,
they become a few fused loops in one generated function, and Levante's kernels (quantized matmuls,
KV write, paged attention) are called from it as opaque operators. On CPU shapes are dynamic (one
graph serves every batch); on CUDA each batch is padded to a bucket and captured as a CUDA graph per
bucket (Inductor's `triton.cudagraphs`, what `mode="reduce-overhead"` sets), the padding rows
writing only the cache's scratch block. The eager `Runner.forward` stays the reference: tests
compare the two token for token, and every failure to compile falls back to it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from levante import kernels
from levante.engine.attention import CpuPagedAttention
from levante.engine.runner import Runner

log = logging.getLogger("levante.engine")

# bfloat16 intermediates rounded where eager rounds them (a fused rotary or SiLU·mul computed in
# float32 throughout would part from eager in the last bit), and no checks of the generated code's
# own shapes on every call
OPTIONS = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False}
FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """One graph for every batch: sizes of 1 not specialised, sizes that happen to be equal not
    assumed equal, and float constants (norm epsilons) not traced as inputs (Dynamo would trace
    the step twice). Only the warm-up's trace needs it: its graph's guards then hold for every
    later step (tested), and patching the configs costs ~100 µs a call."""
    with (
        torch.fx.experimental._config.patch(backed_size_oblivious=True, use_duck_shape=False),
        torch._dynamo.config.patch(specialize_float=True),
    ):
        yield


def buckets(max_rows: int) -> list[int]:
    """Batch sizes a CUDA graph is captured for: 1, 2, 4, 8, then every 8 up to `max_rows`, as vLLM."""
    sizes = [n for n in (1, 2, 4) if n < max_rows] + list(range(8, max_rows, 8))
    return [*sizes, max_rows]


class CompiledStep:
    """`runner.forward` compiled, for the steps `runner.paged` runs; on a failure to compile, one log
    line and the eager forward from then on."""

    def __init__(self, runner: Runner, sizes: list[int] | None = None) -> None:
        """`sizes`: the batch sizes steps are padded to (CUDA graphs' buckets); None: as they come."""
        self.eager = runner.forward
        self.sizes, self.scratch = sizes, runner.attention.store.scratch
        self.block_size, self.device = runner.block_size, runner.device
        self.cuda_graphs = runner.device.type == "cuda"
        options = {**OPTIONS, "triton.cudagraphs": self.cuda_graphs}
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(
            runner.forward, dynamic=True, fullgraph=True, options=options
        )

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self._run(*args)
            except FAILURES as exc:
                cause = getattr(exc, "inner_exception", None) or exc
                first = next(iter(str(cause).strip().splitlines()), "")
                name = type(cause).__name__
                log.warning("compiling the step failed, running it eagerly: %s: %s", name, first)
                self.compiled = None
        return self.eager(*args)

    def _run(self, *args: torch.Tensor) -> torch.Tensor:
        """`Runner.forward`'s tensors, padded to a bucket where there are buckets."""
        assert self.compiled is not None
        ids, positions, slots, rows, seqs, tables, lens, keep = args
        t, kept = ids.shape[0], keep.shape[0]
        size = next((n for n in self.sizes if n >= t), t) if self.sizes else t
        if size > t:  # padding rows: position 0, the scratch block, a context of one token
            extra, (count, width) = size - t, tables.shape
            ids, positions = F.pad(ids, (0, extra)), F.pad(positions, (0, extra))
            slots = F.pad(slots, (0, extra), value=self.scratch * self.block_size)
            rows = torch.cat([rows, torch.arange(t, size, device=rows.device)])
            seqs = torch.cat([seqs, torch.arange(count, count + extra, device=seqs.device)])
            tables = torch.cat([tables, tables.new_full((extra, width), self.scratch)])
            lens, keep = F.pad(lens, (0, extra), value=1), F.pad(keep, (0, size - kept), value=size - 1)
        if self.sizes:  # table widths in powers of two, so a graph serves contexts up to its width
            tables = F.pad(tables, (0, (1 << (tables.shape[1] - 1).bit_length()) - tables.shape[1]))
        logits = self.compiled(ids, positions, slots, rows, seqs, tables, lens, keep)[:kept]
        return logits.clone() if self.cuda_graphs else logits  # a graph's next replay overwrites it

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles now (captures each bucket's graph), over steps that write only the scratch block."""
        start = time.perf_counter()
        device = self.device
        for t in self.sizes or [1]:
            rows, keep = (torch.arange(t, device=device) for _ in range(2))  # distinct, as in a step
            ones = torch.ones(t, dtype=torch.long, device=device)
            tables = ones[:, None].repeat(1, 2) * self.scratch
            slots = ones * self.scratch * self.block_size
            with _tracing():
                self(ones * 0, ones * 0, slots, rows, rows.clone(), tables, ones, keep)
            if self.compiled is None:
                return
        log.info("compiled the step in %.1f s", time.perf_counter() - start)


def _cache_per_cpu() -> None:
    """Inductor's on-disk cache, unless the user chose its place, in a folder per CPU target (the
    kernels' name for it: the CPU's flags, or the ISA a test forces), so a cache shared between
    machines never hands one CPU code generated for another's instruction set."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"levante_{kernels.target()[0]}")


def compile_runner(runner: Runner, max_rows: int) -> bool:
    """Puts `runner.paged` on the compiled step and compiles it now; False (and eager) where the
    step's kernels would not compile into it: on CPU they must be Levante's (the pure-PyTorch paged
    attention is for reference). On CUDA steps are padded to `buckets(max_rows)`."""
    device = runner.device
    if device.type == "cpu":
        if not isinstance(runner.attention, CpuPagedAttention):
            log.info("the step runs eagerly: Levante's CPU kernels are not available")
            return False
        _cache_per_cpu()
    step = CompiledStep(runner, buckets(max_rows) if device.type == "cuda" else None)
    step.warm_up()
    if step.compiled is None:
        return False
    runner.paged = step
    return True
