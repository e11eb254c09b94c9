"""The paged step compiled by torch.compile (Inductor): a transform on a built `Runner`, as the
kernel choice in `linears` is a transform on a built model; the model files know nothing of it.

Eager, a decode step dispatches a dozen small operations per layer from Python (norms, rotary,
SiLU·mul, residual adds, views), which costs as much as the matmuls of a small model. Compiled,
they become a few fused loops in one generated function, and Levante's kernels (quantized matmuls,
KV write, paged attention) are called from it as opaque operators. On CPU shapes are dynamic (one
graph serves every batch), compiled ahead of time (`aot_compile`): the artifact is called without
Dynamo's per-call frame hook and guard check (~2 ms a step on the demo model) and kept on disk, so
the next start with the same model, code and CPU loads it in a second or two instead of tracing
again. On CUDA each batch is padded to a bucket and captured as a CUDA graph per bucket (Inductor's
`triton.cudagraphs`, what `mode="reduce-overhead"` sets), the padding rows writing only the cache's
scratch block. The eager `Runner.forward` stays the reference: tests compare the two token for
token, and every failure to compile falls back to it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from levante import kernels
from levante.engine import runner as runner_module
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
        self.runner, self.eager = runner, runner.forward
        self.sizes, self.scratch = sizes, runner.attention.store.scratch
        self.block_size, self.device = runner.block_size, runner.device
        self.cuda_graphs = runner.device.type == "cuda"
        options = {**OPTIONS, "triton.cudagraphs": self.cuda_graphs}
        self.compiler = torch.compile(runner.forward, dynamic=True, fullgraph=True, options=options)
        # on CPU, set by `warm_up` to the ahead-of-time artifact
        self.compiled: Callable[..., torch.Tensor] | None = None if self.ahead_of_time else self.compiler
        self.loaded_from: Path | None = None  # the artifact file the CPU step came from, if cached

    @property
    def ahead_of_time(self) -> bool:
        return not self.cuda_graphs

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self._run(*args)
            except FAILURES as exc:
                self._failed(exc)
        return self.eager(*args)

    def _failed(self, exc: Exception) -> None:
        cause = getattr(exc, "inner_exception", None) or exc
        first = next(iter(str(cause).strip().splitlines()), "")
        log.warning("compiling the step failed, running it eagerly: %s: %s", type(cause).__name__, first)
        self.compiled = None

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
        """Compiles now (captures each bucket's graph; on CPU, loads the cached artifact or compiles
        one and saves it), over steps that write only the scratch block."""
        start = time.perf_counter()
        device = self.device
        for t in self.sizes or [1]:
            rows, keep = (torch.arange(t, device=device) for _ in range(2))  # distinct, as in a step
            ones = torch.ones(t, dtype=torch.long, device=device)
            tables = ones[:, None].repeat(1, 2) * self.scratch
            slots = ones * self.scratch * self.block_size
            args = (ones * 0, ones * 0, slots, rows, rows.clone(), tables, ones, keep)
            if self.ahead_of_time and self.compiled is None and not self._ahead_of_time(args):
                return
            with _tracing():
                self(*args)
            if self.compiled is None:
                return
        how = f"loaded the compiled step from {self.loaded_from}" if self.loaded_from else "compiled the step"
        log.info("%s in %.1f s", how, time.perf_counter() - start)

    def _ahead_of_time(self, args: tuple[torch.Tensor, ...]) -> bool:
        """self.compiled ← the CPU artifact: loaded where one was saved for this model, code and
        CPU (see `artifact_key`) and its guards pass on `args`, else compiled from `args` and saved;
        False (logged, eager from then on) where it does not compile. Later calls skip the guard
        check: the graph was traced for any batch (see `_tracing`), and the key stands for the rest."""
        external = {"runner": self.runner}  # the live model, KV cache and layout, never pickled
        artifact, path = None, None
        try:
            path = _artifact_dir() / f"{artifact_key(self.runner)}.pt2"
            if path.exists():
                with path.open("rb") as f:
                    artifact = torch.compiler.load_compiled_function(
                        f, f_globals=vars(runner_module), external_data=external
                    )
                if not artifact.guard_check(self.runner, *args):
                    raise ValueError("its guards do not hold for this runner")
                artifact(self.runner, *args)  # a first step, which must run
                self.loaded_from = path
        except Exception as exc:  # a damaged, foreign or unreadable file: compile afresh (over it)
            log.warning("the cached compiled step %s did not load (%s); compiling again", path, exc)
            artifact = None
        if artifact is None:
            try:
                with _tracing():
                    artifact = self.compiler.aot_compile((args, {}))
            except Exception as exc:  # whatever the compiler stack raises, the eager step runs
                self._failed(exc)
                return False
            try:
                assert path is not None
                path.parent.mkdir(parents=True, exist_ok=True)
                artifact.save_compiled_function(str(path), external_data=external)
            except Exception as exc:  # an unwritable cache costs the next start a compile, nothing more
                log.warning("the compiled step was not saved to %s: %s", path, exc)
        artifact.disable_guard_check()
        self.compiled = functools.partial(artifact, self.runner)
        return True


def _artifact_dir() -> Path:
    """Compiled steps, next to Inductor's own cache (per CPU target, see `_cache_per_cpu`)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "levante_steps"


def artifact_key(runner: Runner) -> str:
    """What the compiled step depends on besides the values of its tensors: Python's and torch's
    versions, Inductor's settings and the threads its loops are generated for, the CPU target,
    Levante's source, the runner's structure (every module's type, scalar settings and tensors'
    shapes, dtypes and strides: weights, packed weights, rotary tables) and the KV cache's layout.
    Not its length: the graph reads the cache's size at run time, so a start with another
    --kv-cache-memory loads the same artifact; nor the weights' values (both tested)."""
    import torch._inductor.config as inductor

    digest = hashlib.sha256()
    package = Path(__file__).parents[1]
    for source in sorted([*package.rglob("*.py"), *package.glob("kernels/csrc/*.*")]):
        digest.update(source.read_bytes())
    settings = sorted(inductor.save_config_portable().items())
    store = runner.attention.store
    cache = (store.k.dtype, store.k.shape[:2], store.k.shape[3:], store.block_size, store.k.device.type)
    digest.update(f"{sys.version} {torch.__version__} {settings} {torch.get_num_threads()}".encode())
    digest.update(f"{kernels.target()[0]} {runner.block_size} {cache}".encode())
    for name, module in runner.model.named_modules():
        digest.update(f"{name}:{type(module).__qualname__}:{_signature(vars(module))}".encode())
    digest.update(f"{type(runner.attention).__qualname__}".encode())
    return digest.hexdigest()[:32]


def _signature(value: object) -> str:
    """Tensors by shape, dtype and stride, containers by their items, scalars and settings
    (dataclasses without tensors: the model's config) by value; other objects (modules, functions,
    the last step's layout) by type only."""
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{value.dtype}{value.stride()}{value.device.type}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_signature(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_signature, value)) + "]"
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    settings = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if settings and not any(isinstance(v, torch.Tensor) for v in vars(value).values()):
        return repr(value)
    return type(value).__qualname__


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
