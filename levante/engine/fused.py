"""The paged step's whole model in one call of Levante's CPU kernels (`torch.ops.levante.fused_step`
over a `torch.classes.levante.FusedPlan` made once): a transform on a built `Runner`, as the
compiled step is.

A single-stream decode step of a small model spends as long calling operators as reading weights:
eager, a dozen from Python per layer; compiled, ~240 from the generated wrapper plus the guard-free
call's own prologue, ~2 ms a token on the demo model against ~8 ms of matmuls. The fused call runs
the same kernels on the same values (embedding rows, norm, projection, rotary, KV write, paged
attention, residual, SiLU·mul, final norm, LM head) from C++: a decode step in one parallel region
(threads meet at barriers, never fork and join), a larger step (a prefill chunk) kernel by kernel.
So a step costs its matmuls and one call. The same bits as the eager step (tested token for token
and logit for logit), so batch-invariant wherever the eager step is.

It applies where the model is the plain decoder on Levante's kernels: batch-invariant mode on CPU
(dense weights on `kernels.linear`, GGUF blocks on `kernels.quant_linear`), one process (tensor
parallelism's all-reduces live in its own modules), and ATen's elementwise exp reachable from the
kernels' build (see csrc/decode.cpp). Elsewhere the compiled step (`compiled`) runs."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from levante import kernels
from levante.engine.attention import CpuPagedAttention
from levante.engine.linears import KernelLinear, KernelRMSNorm, PackedQuantLinear
from levante.engine.runner import Runner
from levante.model.quantized import QuantEmbedding

log = logging.getLogger("levante.engine")


def _projection(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[int]] | None:
    """(tensors, spec) of a projection or embedding in the layout csrc/decode.cpp reads, None if
    not a kernel's."""
    if isinstance(module, KernelLinear):
        return [module.weight], [0, module.out_features]
    if isinstance(module, PackedQuantLinear):
        blocks = [getattr(module, f"blocks{i}") for i in range(len(module.qtypes))]
        return blocks, [len(blocks), module.in_features, *module.qtypes]
    if type(module) is nn.Embedding:
        return [module.weight], [0, module.num_embeddings]
    if isinstance(module, QuantEmbedding):
        return [module.blocks], [1, module.embedding_dim, module.qtype]
    return None


def flatten(runner: Runner) -> tuple[list[torch.Tensor], list[int], float] | None:
    """The model's weights and spec for `FusedPlan` (embedding, each layer's, final norm, LM head),
    and the norms' epsilon; None where a part is not the plain decoder on Levante's kernels."""
    decoder = runner.model.decoder
    parts: list[torch.nn.Module] = [decoder.embed_tokens]
    for index, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.layer != index or mlp.act is not F.silu:
            return None
        parts += [layer.input_layernorm, attn.qkv_proj, attn.o_proj, layer.post_attention_layernorm]
        parts += [mlp.gate_up_proj, mlp.down_proj]
    parts += [decoder.norm, decoder.lm_head]
    tensors: list[torch.Tensor] = []
    spec: list[int] = []
    eps: set[float] = set()
    for part in parts:
        if isinstance(part, KernelRMSNorm):
            tensors.append(part.weight)
            eps.add(part.eps)
            continue
        projection = _projection(part)
        if projection is None:
            return None
        tensors += projection[0]
        spec += projection[1]
    if len(eps) != 1:
        return None
    return tensors, spec, eps.pop()


class FusedStep:
    """`runner.forward` for the steps `runner.paged` runs: the whole model in one kernel call."""

    def __init__(self, runner: Runner, weights: list[torch.Tensor], spec: list[int], eps: float) -> None:
        self.runner = runner
        assert isinstance(runner.attention, CpuPagedAttention)
        self.store = runner.attention.store
        decoder = runner.model.decoder
        attn = decoder.layers[0].self_attn
        # the weights checked and laid out once, not passed and read again at every step
        self.plan = torch.classes.levante.FusedPlan(
            decoder.rope, weights, spec, len(decoder.layers), self.store.block_size,
            attn.num_heads, attn.num_kv_heads, eps,
        )  # fmt: skip

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        rows: torch.Tensor,
        seqs: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        store = self.store
        return torch.ops.levante.fused_step(
            self.plan, ids, positions, store.k, store.v, slots, rows, seqs, tables, lens, keep
        )


def fuse_runner(runner: Runner) -> bool:
    """Puts `runner.paged` on the fused layers where they apply (see the module's docstring); False
    (and nothing changed) elsewhere."""
    if not (runner.batch_invariant and isinstance(runner.attention, CpuPagedAttention) and kernels.load()):
        return False
    if not torch.ops.levante.decode_supported():
        log.info("the fused step does not apply: the kernels were built for another ISA than ATen runs")
        return False
    flat = flatten(runner)
    if flat is None:
        return False
    runner.paged = FusedStep(runner, *flat)
    log.info("the paged step runs its layers in one call of Levante's CPU kernels")
    return True
