"""The quantized matmul alone (`levante.kernels.quant_linear`), on random GGUF blocks of the demo
model's and Mistral Small 3.2's shapes: the file's layout against the one the engine packs them
into (`kernels.pack_quant`, AVX-512 builds), for one row of x (single-stream decode) and a few.
Prints ms per call and the weights' bytes per second. Small matrices stay in the caches between
calls, so their rates are above what a decode step sees (there the weights come from memory).

    python benchmarks/quant_matmul.py [--rows 1 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from levante import kernels
from levante.testing.checkpoints import random_blocks

SHAPES = [
    ("demo q/k/v", Q.Q4_1, 960, 576),
    ("demo gate/up", Q.Q4_1, 3072, 576),
    ("demo down", Q.Q4_1, 576, 1536),
    ("demo LM head", Q.Q8_0, 49152, 576),
    ("24B gate", Q.Q4_K, 32768, 5120),
    ("24B down", Q.Q6_K, 5120, 32768),
]


def per_call(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> float:
    """Seconds a call, the best of three timed runs of a few hundred MB of weights each."""
    calls = max(5, int(3e8 / blocks.numel()))
    for _ in range(3):
        kernels.quant_linear(x, [blocks], [qtype], x.shape[1])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            kernels.quant_linear(x, [blocks], [qtype], x.shape[1])
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    assert kernels.load(), "the CPU kernels did not build"
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, kernels for {kernels.target()[0]}, {args.threads} threads")
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
            t_raw, t_packed = per_call(x, raw, int(qtype)), per_call(x, packed, int(qtype))
            mb = raw.numel() / 1e6
            print(
                f"| {name} {n}x{k} {qtype.name} | {mb:.2f} | {rows} | {t_raw * 1e3:.3f} "
                f"| {t_packed * 1e3:.3f} | {mb / 1e3 / t_packed:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
