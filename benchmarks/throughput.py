"""Offline throughput: Levante's engine vs transformers `generate` on the demo model, one run.

N requests with random prompt lengths (32-512 tokens) and output lengths (32-256), fixed seed,
random token ids as in vLLM's random dataset; every request generates exactly its output length
(ignore_eos). transformers runs static padded batches of each size given and its best one is
reported; only each request's own tokens count. Also measures single-stream decode tok/s.

    python benchmarks/throughput.py --requests 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from levante.engine import LLM, EngineConfig, SamplingParams
from levante.loader import demo_model_path
from levante.tokenizer import PromptInputs


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(100, vocab - 100, int(rng.integers(32, 513))).tolist(), int(rng.integers(32, 257)))
        for _ in range(n)
    ]


def run_levante(llm: LLM, jobs: list[tuple[list[int], int]]) -> tuple[float, int]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in jobs]
    start = time.perf_counter()
    results = llm.generate([PromptInputs(p) for p, _ in jobs], params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.outputs[0].token_ids) for r in results)


def run_transformers(
    model: torch.nn.Module, jobs: list[tuple[list[int], int]], batch: int, pad: int
) -> float:
    """Static batches: prompts left-padded to the batch's longest, every row decodes to the
    batch's longest output; the padding work is what continuous batching avoids."""
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        new = max(m for _, m in chunk)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", default="8,16,32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--single-stream-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for both engines")
    ap.add_argument("--threads", type=int, help="torch threads for both engines (default: torch's choice)")
    ap.add_argument("--no-batch-invariant", action="store_true", help="Levante on library kernels")
    ap.add_argument("--compile", action="store_true", help="Levante: the step compiled, as served")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    print(f"model: {path.name}; {args.dtype}; torch threads: {torch.get_num_threads()}")
    llm = LLM(
        path,
        dtype=args.dtype,
        engine=EngineConfig(
            kv_cache_memory=2.0,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            batch_invariant=not args.no_batch_invariant,
            compile=args.compile,
        ),
    )
    print(f"batch-invariant: {llm.engine.batch_invariant}; compiled step: {args.compile}")
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    jobs = workload(args.requests, args.seed, llm.engine.model.config.text.vocab_size)
    useful = sum(m for _, m in jobs)
    print(f"{len(jobs)} requests, {sum(len(p) for p, _ in jobs)} prompt tokens, {useful} output tokens")

    single = [(jobs[0][0][:64], args.single_stream_tokens)]
    lev_single_s, lev_single_n = run_levante(llm, single)
    hf_single_s = run_transformers(hf, single, 1, pad=2)
    print(
        f"single stream decode: levante {lev_single_n / lev_single_s:.1f} tok/s, "
        f"transformers {args.single_stream_tokens / hf_single_s:.1f} tok/s"
    )

    lev_s, lev_n = run_levante(llm, jobs)
    assert lev_n == useful
    lev_rate = lev_n / lev_s
    print(f"levante: {lev_s:.1f} s, {lev_rate:.1f} output tok/s")
    best = 0.0
    for b in (int(x) for x in args.hf_batch_sizes.split(",")):
        hf_s = run_transformers(hf, jobs, b, pad=2)
        rate = useful / hf_s
        best = max(best, rate)
        print(f"transformers batch {b}: {hf_s:.1f} s, {rate:.1f} output tok/s")
    print(f"ratio levante / best transformers: {lev_rate / best:.2f}x")


if __name__ == "__main__":
    main()
