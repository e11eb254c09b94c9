"""The fused step (`levante.engine.fused`: the whole model of a paged step in one kernel call) against
the eager step it replaces, logit for logit, on the demo model's GGUF blocks and its weights as
int4 (the demo dequantized and the tiny Mistral3 with images run fused in test_batch_invariance,
bit for bit against eager, alone, batched, cached, chunked and preempted; the tiny one on every
forced ISA too); where it declines; what the kernel says of inputs it cannot take. And the weights'
move into huge pages (`huge_pages`): the same values, tied tensors still shared, backed by 2 MiB
pages where the kernel's setting allows."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch
from test_batch_invariance import kv_gib
from test_compiled import chats, run
from torch import nn

from levante import kernels
from levante.engine import EngineConfig, SamplingParams
from levante.engine.engine import Engine
from levante.engine.fused import FusedStep, flatten, fuse_runner
from levante.engine.huge_pages import ARENA, SMALLEST, Arena, _tensors, use_huge_pages
from levante.engine.linears import use_linear_kernels
from levante.loader import demo_model_path, load
from levante.tokenizer import PromptInputs


def _engine(loaded, **config: object) -> Engine:  # type: ignore[no-untyped-def]
    settings = dict(kv_cache_memory=0.05, max_num_seqs=4, max_num_batched_tokens=96)
    return Engine(loaded.model, loaded.tokenizer, EngineConfig(**{**settings, **config}))  # type: ignore[arg-type]


def _assert_one_region(step: FusedStep) -> None:
    """A decode step runs in one parallel region, unless a weight is packed for AMX tiles (which
    only the per-call kernels read): the bits are the same either way, so only this tells."""
    flat = flatten(step.runner)
    assert flat is not None
    assert step.plan.one_region() != any(t.dim() == 5 for t in flat[0])


@pytest.mark.parametrize("weights", ["gguf", "int4"])
def test_fused_steps_give_the_eager_logits_bit_for_bit(weights: str) -> None:
    assert kernels.load(), "the CPU kernels did not build"
    kw = dict(quantized=True) if weights == "gguf" else dict(quantized=False, quantization="int4")
    loaded = load(None, dtype="bfloat16", progress=False, **kw)
    engine = _engine(loaded)
    runner = engine.runner
    eager = runner.forward
    assert fuse_runner(runner) and isinstance(runner.paged, FusedStep)
    _assert_one_region(runner.paged)
    fused, compared = runner.paged, []

    def both(*args: torch.Tensor) -> torch.Tensor:  # eager first, then fused over the same cache slots
        reference = eager(*args)
        out = fused(*args)
        compared.append((args[0].shape[0], torch.equal(out, reference)))
        return out

    runner.paged = both
    for i in range(4):  # prompts of 40-61 tokens, prefilled in chunks beside others' decode rows
        prompt = list(range(100 + i, 140 + 7 * i))
        engine.add_request(
            f"r{i}", PromptInputs(prompt), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
    while engine.has_unfinished():
        engine.step()
    assert len(compared) > 12 and all(same for _, same in compared), compared
    assert {rows for rows, _ in compared} >= {1, 4} and max(rows for rows, _ in compared) > 4


def test_the_demo_compiled_on_cpu_gives_the_eager_tokens_for_32_mixed_chats() -> None:
    """test_compiled's 32 chats (joining and leaving, grammar-bound, preempted) on the demo model, as
    `compile` runs it on CPU: its GGUF blocks in the fused step."""
    loaded = load(demo_model_path(), dtype="bfloat16", progress=False)
    inputs = chats(loaded, images=False)
    settings = dict(max_num_seqs=8, max_num_batched_tokens=256)
    eager = run(_engine(loaded, **settings), inputs)
    assert len({tuple(t) for t in eager}) > 16  # the answers differ from each other
    fused = _engine(loaded, compile=True, **settings)
    assert isinstance(fused.runner.paged, FusedStep)
    _assert_one_region(fused.runner.paged)
    assert run(fused, inputs) == eager
    preempted = _engine(loaded, compile=True, max_num_seqs=8, kv_cache_memory=kv_gib(loaded, 200))
    assert run(preempted, inputs[:6]) == eager[:6] and preempted.stats.preemptions > 0


def test_fusion_declines_what_it_cannot_run(tiny_mistral: Path) -> None:
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    assert not fuse_runner(_engine(loaded, batch_invariant=False).runner)  # oneDNN's linears: not its kernels
    runner = _engine(loaded).runner
    assert flatten(runner) is not None
    layer = runner.model.decoder.layers[1].self_attn
    layer.o_proj = nn.Sequential(layer.o_proj)  # a module it does not know (as tensor parallelism's)
    assert flatten(runner) is None and not fuse_runner(runner)
    assert runner.paged == runner.forward


def test_the_kernel_refuses_weights_that_do_not_match_the_spec(tiny_mistral: Path) -> None:
    loaded = load(tiny_mistral, dtype="float32", progress=False)
    runner = _engine(loaded).runner
    flat = flatten(runner)
    assert flat is not None
    weights, spec, eps = flat  # embedding, layer 0's input norm, qkv, o, ...
    store, attn = runner.attention.store, runner.model.decoder.layers[0].self_attn
    decoder = runner.model.decoder
    vocab = decoder.embed_tokens.num_embeddings

    def plan(weights: list[torch.Tensor], spec: list[int]) -> torch.ScriptObject:
        return torch.classes.levante.FusedPlan(
            decoder.rope, weights, spec, len(decoder.layers), store.block_size, attn.num_heads,
            attn.num_kv_heads, eps,
        )  # fmt: skip

    def call(
        rows: int = 1, position: int = 0, slot: int = 0, token: int = 0, kept: int = 0, length: int = 1,
        block: int = 0, paged: int = 0, seq: int = 0, tokens: torch.dtype = torch.long,
    ) -> torch.Tensor:  # fmt: skip
        ids = torch.zeros(rows, dtype=torch.long)
        return torch.ops.levante.fused_step(
            plan(weights, spec), (ids + token).to(tokens), ids + position, store.k, store.v,
            ids + slot, torch.arange(rows) + paged, ids + seq, torch.tensor([[block]]), ids + length,
            torch.tensor([kept]),
        )  # fmt: skip

    assert call().shape == (1, vocab)
    with pytest.raises(RuntimeError, match="fused_step: fewer weights than the spec describes"):
        plan(weights[:-1], spec)
    with pytest.raises(RuntimeError, match="fused_step: the spec ends early"):
        plan(weights, spec[:-2])
    with pytest.raises(RuntimeError, match="fused_step: more weights or spec than"):
        plan([*weights, weights[1]], spec)
    with pytest.raises(RuntimeError, match="fused_step: the qkv weight must be dense"):
        plan([*weights[:2], weights[3], *weights[3:]], spec)  # the o projection's weight where qkv's goes
    past = decoder.rope.shape[1]  # a position the rotary table has no row for
    for rows in (1, 16):  # a decode step in one parallel region, and a chunk through the per-call kernels
        with pytest.raises(RuntimeError, match=f"fused_step: position {past} past the rotary table"):
            call(rows, position=past)
    with pytest.raises(RuntimeError, match="write_kv: slot -1 out of range"):
        call(slot=-1)
    with pytest.raises(RuntimeError, match=f"fused_step: token id {vocab} outside the vocabulary"):
        call(token=vocab)
    with pytest.raises(RuntimeError, match="fused_step: kept row 1 is not one of the 1 rows"):
        call(kept=1)
    with pytest.raises(RuntimeError, match="fused_step: a context of 0 tokens does not fit"):
        call(length=0)
    with pytest.raises(RuntimeError, match="fused_step: block -1 is not in the cache"):
        call(block=-1)
    with pytest.raises(RuntimeError, match="fused_step: paged row 1 is not one of the 1 rows"):
        call(paged=1)
    with pytest.raises(RuntimeError, match="fused_step: sequence 1 has no block table"):
        call(seq=1)
    with pytest.raises(RuntimeError, match=r"fused_step: ids, positions, .* must be dense int64"):
        call(tokens=torch.int32)


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, in KiB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _big(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of at least SMALLEST bytes under `module`, by its path."""
    return {
        f"{path}.{name}": t
        for path, m in module.named_modules()
        for name, t in _tensors(m)
        if t.numel() * t.element_size() >= SMALLEST
    }


def test_weights_move_to_huge_pages_with_their_values_and_sharing() -> None:
    loaded = load(None, dtype="bfloat16", quantized=False, progress=False)
    decoder = loaded.model.decoder
    use_linear_kernels(loaded.model, batch_invariant=True)  # as the engine does first: packed weights too
    decoder.norm.table = decoder.embed_tokens.weight  # a tensor held twice (as a tied head was)
    before = {path: t.clone() for path, t in _big(decoder).items()}
    assert len(before) >= 120
    moved = use_huge_pages(decoder)
    after = _big(decoder)
    assert (
        after.keys() == before.keys()
        and moved >= sum(t.numel() * t.element_size() for t in before.values()) // 2
    )
    for path, t in after.items():
        assert torch.equal(t, before[path]), path
    assert decoder.norm.table.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # still one tensor
    arenas = {t.untyped_storage().data_ptr(): t.data_ptr() for t in after.values()}
    # packed into a few arenas, not one block per tensor (an arena's tail too short for the next
    # large tensor, the embedding or the LM head, stays unused)
    assert len(arenas) <= 2 + moved // ARENA
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    huge = sum(_anon_huge_kib(address) for address in arenas.values()) << 10
    if "[never]" in setting:  # the kernel backs nothing with huge pages: the move changed nothing else
        assert huge == 0
    else:  # madvise or always: advised, written ranges are backed by 2 MiB pages
        assert huge >= moved // 2, (huge, moved)
    assert use_huge_pages(decoder) == 0  # what is in an arena stays there


def test_an_engine_set_up_for_speed_serves_from_huge_pages() -> None:
    loaded = load(None, dtype="bfloat16", quantized=False, progress=False)
    eager = _engine(loaded)  # the library's default, the reference: weights left where they were
    assert use_huge_pages(eager.model.decoder) > 0
    loaded = load(None, dtype="bfloat16", quantized=False, progress=False)
    decoder = _engine(loaded, compile=True).model.decoder
    head = decoder.lm_head.weight
    assert head.untyped_storage().nbytes() > head.numel() * head.element_size()  # inside an arena
    assert use_huge_pages(decoder) == 0  # nothing left to move


def test_only_an_arena_s_own_storage_counts_as_moved() -> None:
    """Memory at an arena's address is not the arena: a block freed and its address handed to a later
    model's tensor (glibc unmaps and maps blocks this large at the same place) left that tensor
    where it was and the engine serving it on 4 KiB pages (CI, where the demo model loads many times)."""
    layer = nn.Linear(512, 512)
    assert use_huge_pages(layer) == 512 * 512 * 4
    storage = layer.weight.untyped_storage()
    memory = (ctypes.c_uint8 * storage.nbytes()).from_address(storage.data_ptr())
    alias = torch.frombuffer(memory, dtype=torch.uint8)
    assert alias.data_ptr() == storage.data_ptr() and not Arena.holds(alias) and Arena.holds(layer.weight)
    size = storage.nbytes()
    del layer, storage, alias
    later = nn.Linear(512, 512)
    later.weight.data = torch.empty(size, dtype=torch.uint8).view(torch.float32)[: 512 * 512].view(512, 512)
    assert use_huge_pages(later) == 512 * 512 * 4  # wherever the allocator put it, it moves
