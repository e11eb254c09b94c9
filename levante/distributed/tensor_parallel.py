"""Tensor parallelism over a torch.distributed group (NCCL on GPUs, gloo on CPU).

As in gpt-fast it is a transform on the built model; the model files know nothing of it. `shard`
swaps the decoder's modules for per-rank ones while the model is still on the meta device, and
returns a checkpoint view that hands each rank only its slices, so no rank ever holds the whole
model. The layout is Megatron's: q/k/v and gate/up are column-parallel (a rank holds a contiguous
range of KV groups with their query heads, and of the MLP's hidden units), o and down are
row-parallel (partial sums all-reduced), the embedding and the LM head are vocabulary-parallel (a
masked lookup all-reduced; logits all-gathered). Heads split as evenly as the KV groups allow, so
the demo model's 3 KV heads go 2:1 over two ranks.

The vision tower and projector are not sharded: they are ~2% of Mistral Small's weights and run
once per image, not once per token. Rank 0 alone holds and runs them; the image rows it produces
travel with the step. Rank 0 runs the whole engine; every step it broadcasts the batch (`Step`:
ids, positions, cache layout, image rows) and the other ranks run the same forward in lockstep
until it says stop."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing.connection
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from levante.errors import CheckpointError, LevanteError
from levante.model import Model
from levante.model.quantized import QuantizedTensor
from levante.weights.checkpoint import Checkpoint, TensorEntry

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from levante.engine.engine import EngineConfig
    from levante.engine.runner import Step

log = logging.getLogger("levante.distributed")

IDLE_TIMEOUT = timedelta(days=365)  # ranks wait on the control group for as long as the server idles


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share of n units, as even as possible (the first ranks take the rest)."""
    base, rest = divmod(n, world)
    start = rank * base + min(rank, rest)
    return start, start + base + (rank < rest)


# ---- the sharded modules ------------------------------------------------------------------------


def _meta_weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


class RowParallelLinear(nn.Module):
    """A bias-free Linear over this rank's slice of the input features; all ranks' partial outputs
    are summed, so each ends with the full output. The slice is a plain `linear` inside, which the
    loader and the engine treat as any other (quantized weights, kernels) while the sum stays here."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.linear: nn.Module = nn.Linear(in_features, out_features, bias=False, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the embedding: each rank looks up the ids it holds, zeros the others,
    and the sum over ranks is the full lookup (exact: one term is non-zero)."""

    def __init__(self, start: int, stop: int, dim: int) -> None:
        super().__init__()
        self.start = start
        self.weight = _meta_weight(stop - start, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        held = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(held, local, 0), self.weight)
        out.masked_fill_(~held[:, None], 0)
        dist.all_reduce(out)
        return out


class VocabParallelHead(nn.Module):
    """Rows [start, stop) of the LM head; every rank gathers all ranks' logits. Shares may differ by
    one row, so they are padded to the largest for the gather (collectives want equal sizes)."""

    def __init__(self, vocab: int, world: int, rank: int, dim: int) -> None:
        super().__init__()
        self.sizes = [b - a for a, b in (split(vocab, world, r) for r in range(world))]
        self.weight = _meta_weight(self.sizes[rank], dim)
        self.kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.kernel(hidden, self.weight)
        width = max(self.sizes)
        parts = [local.new_empty(local.shape[0], width) for _ in self.sizes]
        dist.all_gather(parts, F.pad(local, (0, width - local.shape[1])))
        return torch.cat([p[:, :n] for p, n in zip(parts, self.sizes, strict=True)], dim=1)


# ---- the transform ------------------------------------------------------------------------------


class Cut(NamedTuple):
    """The slice [start, stop) along `dim` of a full tensor of shape `full` that a rank holds, and
    the parameter it loads into (`None`: the one named like the tensor)."""

    dim: int
    start: int
    stop: int
    full: tuple[int, ...]
    target: str | None = None


@dataclass(frozen=True)
class ShardedCheckpoint(Checkpoint):
    """The tensors one rank holds: its slice of each sharded tensor (copied, so the full tensor is
    freed at once), the rest whole, and nothing under the `skip` prefixes. A quantized tensor is
    sliced in its blocks, or dequantized first where the slice would cut through blocks."""

    cuts: dict[str, Cut] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def entries(self) -> Iterator[TensorEntry]:
        for entry in super().entries():
            if entry.name.startswith(self.skip):
                continue
            cut = self.cuts.get(entry.name)
            if cut is not None:
                if tuple(entry.tensor.shape) != cut.full:
                    raise CheckpointError(
                        f"{entry.file}: tensor {entry.source!r} has shape {tuple(entry.tensor.shape)}, "
                        f"the model expects {cut.full}"
                    )
                tensor, length = entry.tensor, cut.stop - cut.start
                try:
                    sliced = tensor.narrow(cut.dim, cut.start, length)
                except ValueError:  # quantized, and the cut falls inside its blocks
                    assert isinstance(tensor, QuantizedTensor)
                    sliced = tensor.dequantize(torch.float32).narrow(cut.dim, cut.start, length)
                entry = replace(entry, name=cut.target or entry.name, tensor=sliced.clone())
            yield entry


@dataclass(frozen=True)
class Plan:
    """What one rank holds: the slice of each full checkpoint tensor its sharded parameters take,
    and the name prefixes of the tensors it does not hold at all."""

    cuts: dict[str, Cut]
    skip: tuple[str, ...]

    def select(self, checkpoint: Checkpoint) -> ShardedCheckpoint:
        """The view of `checkpoint` that loads exactly this rank's parameters."""
        return ShardedCheckpoint(checkpoint.path, checkpoint.config, checkpoint.source, self.cuts, self.skip)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shard(model: Model, rank: int, world: int) -> Plan:
    """Turns the meta-device `model` into rank `rank` of `world`; the plan says what to load."""
    text = model.config.text
    if text.num_kv_heads < world:
        raise LevanteError(
            f"the model has {text.num_kv_heads} KV heads: it cannot be split over {world} ranks"
        )
    full = _numel(model)
    cuts: dict[str, Cut] = {}

    def column(parent: nn.Module, path: str, name: str, span: tuple[int, int]) -> None:
        old = getattr(parent, name)
        setattr(parent, name, nn.Linear(old.in_features, span[1] - span[0], bias=False, device="meta"))
        cuts[f"{path}.{name}.weight"] = Cut(0, *span, tuple(old.weight.shape))

    def row(parent: nn.Module, path: str, name: str, span: tuple[int, int]) -> None:
        old = getattr(parent, name)
        setattr(parent, name, RowParallelLinear(old.out_features, span[1] - span[0]))
        cuts[f"{path}.{name}.weight"] = Cut(1, *span, tuple(old.weight.shape), f"{path}.{name}.linear.weight")

    d, hd, group = text.hidden_size, text.head_dim, text.num_heads // text.num_kv_heads
    kv0, kv1 = split(text.num_kv_heads, world, rank)
    q_rows, kv_rows = (kv0 * group * hd, kv1 * group * hd), (kv0 * hd, kv1 * hd)
    ffn = split(text.intermediate_size, world, rank)
    for i, layer in enumerate(model.decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_heads, attn.num_kv_heads = (kv1 - kv0) * group, kv1 - kv0
        path = f"decoder.layers.{i}.self_attn"
        column(attn, path, "q_proj", q_rows)
        column(attn, path, "k_proj", kv_rows)
        column(attn, path, "v_proj", kv_rows)
        row(attn, path, "o_proj", q_rows)
        path = f"decoder.layers.{i}.mlp"
        column(mlp, path, "gate_proj", ffn)
        column(mlp, path, "up_proj", ffn)
        row(mlp, path, "down_proj", ffn)
    vocab = split(text.vocab_size, world, rank)
    model.decoder.embed_tokens = VocabParallelEmbedding(*vocab, d)
    model.decoder.lm_head = VocabParallelHead(text.vocab_size, world, rank, d)
    cuts["decoder.embed_tokens.weight"] = Cut(0, *vocab, (text.vocab_size, d))
    if text.tie_word_embeddings:  # the same rows on both sides; the loader ties them again
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    else:
        cuts["decoder.lm_head.weight"] = Cut(0, *vocab, (text.vocab_size, d))
    skip: tuple[str, ...] = ()
    if rank and model.vision is not None:
        model.vision = model.projector = None
        skip = ("vision.", "projector.")
    log.info(
        "tensor parallel rank %d of %d holds %d of the model's %d parameters: %d of the %d sharded ones",
        rank,
        world,
        _numel(model),
        full,
        sum(math.prod(c.full) // c.full[c.dim] * (c.stop - c.start) for c in cuts.values()),
        sum(math.prod(c.full) for c in cuts.values()),
    )
    return Plan(cuts, skip)


# ---- the group and the lockstep protocol ----------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank > 0 needs to build its shard and runner, as rank 0 was asked to."""

    model: str | None  # None: the demo model
    dtype: str
    device: str
    engine: EngineConfig
    quantization: str | None = None
    mmproj: str | None = None
    quantized: bool = True  # GGUF blocks kept as they are (False: dequantized at load)


class _Group:
    """This process's membership: the gloo control group that carries the steps (it may wait for as
    long as the server idles), and on rank 0 the workers it spawned (none under torchrun)."""

    def __init__(self, workers: list[mp.Process]) -> None:
        self.control: dist.ProcessGroup | None = None  # set once every rank has joined
        self.workers = workers
        self.lock = threading.Lock()  # the engine thread's steps vs the exit handler's stop
        self.stopped = threading.Event()


_group: _Group | None = None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the group's size; (0, 1) without tensor parallelism."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _control() -> dist.ProcessGroup:
    assert _group is not None and _group.control is not None, "no tensor-parallel group"
    return _group.control


def _join(group: _Group, rank: int, world: int, device: str, store: dist.Store | None) -> None:
    """Makes `group` this process's: the default group (NCCL on GPUs, gloo on CPU) and the control
    group. On GPUs rank r takes GPU r (the local rank under torchrun)."""
    global _group
    _group = group
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    group.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def start(size: int, spec: WorkerSpec) -> None:
    """Makes this process rank 0 of a `size`-way tensor-parallel group (nothing to do for 1).

    Under torchrun (WORLD_SIZE set) the group is torchrun's: the other ranks turn into workers
    here and exit when rank 0 stops. Otherwise the `size - 1` workers are spawned here. Rank 0
    stops them when it exits."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and launched != size:
        raise LevanteError(f"torchrun started {launched} processes: pass --tensor-parallel-size {launched}")
    if size == 1:
        return
    if _group is not None:
        raise LevanteError("this process already runs a tensor-parallel group")
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is not None:
        raise LevanteError(f"--device {spec.device}: tensor parallelism takes --device cuda (rank r: GPU r)")
    if launched > 1:
        rank = int(os.environ["RANK"])
        _join(_Group([]), rank, size, spec.device, None)
        if rank:
            _follow(spec)
            sys.exit(0)
    else:
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
        level = logging.getLogger("levante").getEffectiveLevel()
        context = mp.start_processes(
            _spawned, (size, store.port, spec, level), nprocs=size - 1, join=False, start_method="spawn"
        )
        group = _Group(context.processes)
        threading.Thread(target=_watch, args=(group,), name="levante-tp-watch", daemon=True).start()
        _join(group, 0, size, spec.device, store)
    atexit.register(stop)


def _watch(group: _Group) -> None:
    """Ends rank 0 when a spawned worker dies unasked: its shard is gone, no step can run again,
    and a collective waiting for it might hang instead of failing."""
    multiprocessing.connection.wait([p.sentinel for p in group.workers])
    if not group.stopped.is_set():
        dead = next(p for p in group.workers if p.exitcode is not None)
        log.error("a tensor-parallel worker exited with status %s; stopping", dead.exitcode)
        os._exit(1)


def _spawned(index: int, size: int, port: int, spec: WorkerSpec, level: int) -> None:
    """Entry point of a spawned rank (index + 1); its failures are logged (the spawn machinery
    would only queue them for a join that rank 0 may never reach)."""
    rank = index + 1
    logging.basicConfig(format=f"rank {rank}: %(name)s: %(message)s")
    logging.getLogger("levante").setLevel(level)
    try:
        _join(_Group([]), rank, size, spec.device, dist.TCPStore("127.0.0.1", port, size, is_master=False))
        _follow(spec)
    except LevanteError as e:  # one clear line, as the CLI gives
        log.error("%s", e)
        sys.exit(1)
    except Exception:
        log.exception("tensor parallel rank %d failed", rank)
        raise


def _follow(spec: WorkerSpec) -> None:
    """A worker's life: load its shard, build its runner, run each step rank 0 sends until None."""
    from levante.engine.engine import build_runner
    from levante.loader import demo_model_path, load_model

    model = load_model(
        spec.model or demo_model_path(),
        dtype=spec.dtype,
        device=spec.device,
        progress=False,
        quantization=spec.quantization,
        mmproj=spec.mmproj,
        quantized=spec.quantized,
    )
    runner = build_runner(model, spec.engine)
    while True:
        message: list[Step | None] = [None]
        dist.broadcast_object_list(message, src=0, group=_control())
        if message[0] is None:
            break
        runner.execute(message[0])
    dist.destroy_process_group()


def broadcast_step(step: Step) -> None:
    """Rank 0: sends a step to the other ranks (image rows by value, through the CPU)."""
    control = _control()
    if step.images is not None:
        step = replace(step, images=step.images.cpu())
    assert _group is not None
    with _group.lock:
        if _group.stopped.is_set():
            raise RuntimeError("the tensor-parallel workers have stopped")
        dist.broadcast_object_list([step], src=0, group=control)


def agree(num_blocks: int) -> int:
    """The smallest value over the ranks (every rank's KV cache must fit the same block table)."""
    if _group is None:
        return num_blocks
    value = torch.tensor([num_blocks])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_control())
    return int(value)


def exit_served(code: int) -> NoReturn:
    """Rank 0's end after serving: every exit handler runs (`stop` among them: the workers told,
    joined, the groups destroyed), then the process leaves without the interpreter's teardown, where
    gloo's threads have been seen to abort it after a clean drain (SIGABRT, "terminate called without
    an active exception"; PyTorch issue 190489): three full test runs here lost the served TP=2 test so."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop() -> None:
    """Rank 0: tells the workers to exit, waits for them, and leaves the group."""
    global _group
    if _group is None:
        return
    group, _group = _group, None
    with group.lock:
        group.stopped.set()
        with contextlib.suppress(RuntimeError):  # a worker already gone needs no stop message
            dist.broadcast_object_list([None], src=0, group=group.control)
    for proc in group.workers:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    dist.destroy_process_group()
