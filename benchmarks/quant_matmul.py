"""The matmul kernels alone, one call at a time, with the weights coming from memory as in a
decode step (each call reads the next of enough copies to pass any last-level cache here).
Quantized (`levante.kernels.quant_linear`): random GGUF blocks of the demo model's and Mistral
Small 3.2's shapes, the file's layout against the one the engine packs them into
(`kernels.pack_quant`, AVX-512 builds). Dense (`kernels.linear`): the demo's shapes in bfloat16,
what its weights dequantized at load run on. One row of x (single-stream decode) and a few; prints
ms per call and the weights' bytes per second. Last, one decode token's matmuls of the demo model
back to back and nothing else, against a plain 1 GiB read: the share of the read's rate no whole
step can pass.

    python benchmarks/quant_matmul.py [--rows 1 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gpu import bandwidth

from levante import kernels
from levante.testing.checkpoints import random_blocks

SHAPES = [
    ("demo q/k/v", Q.Q4_1, 960, 576),
    ("demo o", Q.Q4_1, 576, 576),
    ("demo gate/up", Q.Q4_1, 3072, 576),
    ("demo down", Q.Q4_1, 576, 1536),
    ("demo LM head", Q.Q8_0, 49152, 576),
    ("24B gate", Q.Q4_K, 32768, 5120),
    ("24B down", Q.Q6_K, 5120, 32768),
]
DEMO, DEMO_LAYERS = 5, 30  # the demo's matrices: SHAPES[:DEMO], each once a layer but the LM head


def quantized(x: torch.Tensor, qtype: int, w: torch.Tensor) -> torch.Tensor:
    return kernels.quant_linear(x, [w], [qtype], x.shape[1])


def dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return kernels.linear(x, w, w.shape[0])


def seconds(run: Callable[[], object], repeats: int) -> float:
    """Seconds a call of `run`, the best of three timed runs of `repeats` calls, after one untimed."""
    run()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def each(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()


def per_call(call: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor) -> float:
    """Seconds a call of `call(w)` over copies of `weights` that together pass 256 MB: every call
    reads its weights from memory."""
    copies = [weights.clone() for _ in range(max(2, -(-256_000_000 // weights.nbytes)))]
    passes = max(1, int(1e9 / (len(copies) * weights.nbytes)))
    return seconds(partial(each, [partial(call, w) for w in copies]), passes) / len(copies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    assert kernels.load(), "the CPU kernels did not build"
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    read = bandwidth(torch.device("cpu")) / 1e9
    print(f"{cpu}, kernels for {kernels.target()[0]}, {args.threads} threads; a 1 GiB read: {read:.1f} GB/s")
    print("| weights | MB | rows of x | file's layout ms | packed ms | packed GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, qtype, n, k in SHAPES:
        raw = torch.from_numpy(random_blocks(qtype, (n, k), rng))
        packed = kernels.pack_quant(raw, int(qtype))
        for rows in args.rows:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
            same = torch.equal(
                kernels.quant_linear(x, [raw], [int(qtype)], k),
                kernels.quant_linear(x, [packed], [int(qtype)], k),
            )
            assert same, f"{name}: the packed layout gave other bits"
            t_raw, t_packed = (per_call(partial(quantized, x, int(qtype)), w) for w in (raw, packed))
            mb = raw.numel() / 1e6
            print(
                f"| {name} {n}x{k} {qtype.name} | {mb:.2f} | {rows} | {t_raw * 1e3:.3f} "
                f"| {t_packed * 1e3:.3f} | {mb / 1e3 / t_packed:.1f} |",
                flush=True,
            )

    print("\n| bfloat16 weights | MB | rows of x | ms | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, _, n, k in SHAPES[:DEMO]:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)).bfloat16()
        for rows in args.rows:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
            t = per_call(partial(dense, x), w)
            mb = w.nbytes / 1e6
            print(f"| {name} {n}x{k} | {mb:.2f} | {rows} | {t * 1e3:.3f} | {mb / 1e3 / t:.1f} |")

    print()
    for label, step in demo_steps().items():
        t, mb = seconds(partial(each, step.calls), 10), step.bytes / 1e6
        rate = mb / 1e3 / t
        print(
            f"{label}: {len(step.calls)} calls, {mb:.0f} MB, {t * 1e3:.2f} ms = {rate:.1f} GB/s"
            f" = {rate / read:.0%} of the read"
        )


@dataclass
class Step:
    calls: list[Callable[[], object]]
    bytes: int


def demo_steps() -> dict[str, Step]:
    """One decode token's matmuls of the demo model, one row of x, back to back and nothing else:
    its GGUF blocks packed as the engine packs them, and its weights dequantized to bfloat16. The
    rate they reach bounds what a whole step can reach."""
    rng = np.random.default_rng(1)
    steps = {}
    for label, gguf in (("demo step's matmuls, GGUF packed", True), ("demo step's matmuls, bfloat16", False)):
        calls, total = [], 0
        for layer in range(DEMO_LAYERS + 1):
            for _, qtype, n, k in SHAPES[: DEMO - 1] if layer < DEMO_LAYERS else SHAPES[DEMO - 1 : DEMO]:
                x = torch.randn(1, k).bfloat16()
                if gguf:
                    w = kernels.pack_quant(torch.from_numpy(random_blocks(qtype, (n, k), rng)), int(qtype))
                    calls.append(partial(quantized, x, int(qtype), w))
                else:
                    w = torch.randn(n, k).bfloat16()
                    calls.append(partial(dense, x, w))
                total += w.nbytes
        steps[label] = Step(calls, total)
    return steps


if __name__ == "__main__":
    main()
