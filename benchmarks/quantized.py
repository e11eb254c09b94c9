"""Quantized weights on the demo model, one run: memory, perplexity, prefill and decode speed of
its GGUF kept quantized (Q4_1 + Q8_0 blocks), the same GGUF dequantized at load (bfloat16), and
`--quantization int8|int4` applied to those bfloat16 weights at load (int4 in groups of 32 and 64;
the demo's hidden size, 576, is no multiple of 128).

Perplexity is over the first --tokens tokens of a fixed text in the repository (the HumanEval
sample prompts: code and English docstrings), one uncached forward per model. Speed is offline
through the engine, its step compiled as `levante serve` compiles it (--enforce-eager: not): one
--prompt-len-token prompt generating one token (prefill tok/s), then one short prompt generating
--decode-tokens tokens with ignore_eos (single-stream decode tok/s, the best of --repeats runs), and
what that decode makes of the memory bandwidth: the bytes of weights a token reads (projections and
LM head, as the engine holds them) per second, against a plain read of 1 GiB
(benchmarks/gpu.py's measure, the best of six) taken just before each run. On a shared 2-core
machine both move by a third from minute to minute, so each run is set against its own read and
the table gives the median of those shares. The read is on the 4 KiB pages PyTorch allocates (the
issue's bound), and once more on the 2 MiB pages the engine moves its weights to, which read
faster: the stricter bound, beside it.

    python benchmarks/quantized.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from gpu import read_rate
from gpu import weight_bytes as read_per_token

from levante.engine import Engine, EngineConfig, SamplingParams
from levante.engine.huge_pages import huge_page_copy
from levante.engine.linears import use_linear_kernels
from levante.loader import demo_model_path, load
from levante.model import Model, causal_attention
from levante.tokenizer import PromptInputs

TEXT = Path(__file__).parents[1] / "levante" / "evals" / "samples" / "humaneval.jsonl"


def weight_bytes(model: Model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def perplexity(model: Model, ids: list[int]) -> float:
    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v)

    tokens = torch.tensor(ids)
    with torch.inference_mode():
        logits = model.logits(model(tokens, torch.arange(len(ids)), attention))
    nll = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])
    return float(nll.exp())


def timed(engine: Engine, prompt: list[int], tokens: int) -> float:
    engine.add_request(
        "r", PromptInputs(prompt), SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    )
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5, help="decode runs per variant, each after a read")
    ap.add_argument("--enforce-eager", action="store_true", help="do not compile the step")
    args = ap.parse_args()
    text = "\n".join(json.loads(line)["prompt"] for line in TEXT.read_text().splitlines())
    variants = {
        "GGUF kept quantized": dict(quantized=True),
        "GGUF dequantized at load": dict(quantized=False),
        "--quantization int8": dict(quantized=False, quantization="int8"),
        "--quantization int4": dict(quantized=False, quantization="int4"),
        "--quantization int4, group 64": dict(quantized=False, quantization="int4-g64"),
    }
    print(
        f"demo model {demo_model_path().name}, {args.dtype}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {'eager' if args.enforce_eager else 'compiled'}; "
        f"decode: the best of {args.repeats} runs of {args.decode_tokens} tokens"
    )
    plain = torch.rand(1 << 28)  # 1 GiB, written: on 4 KiB pages
    huge = huge_page_copy(plain)
    columns = "MB | perplexity | prefill tok/s | decode tok/s | MB a token | 1 GiB read | of it"
    columns += " | on 2 MiB pages | of it"
    print(f"| {'weights':26} | {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in variants.items():
        loaded = load(None, dtype=args.dtype, progress=False, **kw)
        mb = weight_bytes(loaded.model) / 1e6  # before the dense weights are packed for the kernel
        use_linear_kernels(loaded.model, batch_invariant=True)
        ids = loaded.tokenizer.encode(text, add_bos=True)[: args.tokens]
        ppl = perplexity(loaded.model, ids)
        config = EngineConfig(kv_cache_memory=0.2, max_num_seqs=1, compile=not args.enforce_eager)
        engine = Engine(loaded.model, loaded.tokenizer, config)
        timed(engine, ids[:16], 4)  # warm-up
        prefill = args.prompt_len / timed(engine, ids[: args.prompt_len], 1)
        read = read_per_token(engine)
        toks, reads = [], {"plain": [], "huge": []}  # each read just before its run
        for _ in range(args.repeats):
            reads["plain"].append(read_rate(plain))
            reads["huge"].append(read_rate(huge) if huge is not None else math.nan)
            toks.append(args.decode_tokens / timed(engine, ids[:8], args.decode_tokens))
        cells = []
        for rates in reads.values():
            share = statistics.median(read * tok / rate for tok, rate in zip(toks, rates, strict=True))
            cells.append(f"{statistics.median(rates) / 1e9:.1f} GB/s | {share:.0%}")
        print(
            f"| {name:26} | {mb:.0f} | {ppl:.4f} | {prefill:.0f} | {max(toks):.1f} | {read / 1e6:.0f} "
            f"| {' | '.join(cells)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
