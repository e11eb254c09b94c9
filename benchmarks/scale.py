"""Mistral Small 3.2 at full size on this machine, from a GGUF in llama.cpp's Q4_K_M recipe.

Writes a GGUF with the real text architecture (40 layers, hidden 5120, 32 heads / 8 KV heads of
128, FFN 32768, vocab 131072, RoPE θ 1e9) whose tensors have the types llama.cpp's Q4_K_M recipe
gives them (Q4_K; Q6_K for the output and for attn_v and ffn_down on the layers its
`use_more_bits` picks), filled with random valid blocks written directly, tensor by tensor (no
float pass; the weights are noise, so answers are too). The vocabulary is the demo model's
byte-level BPE padded to 131072 entries. Then, each in its own process: Levante loads it (time,
peak RSS, resident weights), answers a chat, prefills a prompt, decodes single-stream and admits
a 32K-token prompt into an fp8 KV cache sized for it; and
llama.cpp's `llama-bench` runs the same file when given. The file is deleted afterwards.

    python benchmarks/scale.py --llama-bench ~/.cache/levante-bench/build/bin/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 40, 5120, 32, 8, 128, 32768, 131072
FILE_TYPE_Q4_K_M = 15


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers whose attn_v and ffn_down Q4_K_M stores in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def recipe() -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, PyTorch-order shape, type) of every tensor, in llama.cpp's order."""
    out = [("token_embd.weight", (VOCAB, HIDDEN), "Q4_K")]
    for i in range(LAYERS):
        big = "Q6_K" if more_bits(i, LAYERS) else "Q4_K"
        out += [
            (f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32"),
            (f"blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), "Q4_K"),
            (f"blk.{i}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "Q4_K"),
            (f"blk.{i}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), big),
            (f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), "Q4_K"),
            (f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32"),
            (f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), "Q4_K"),
            (f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), "Q4_K"),
            (f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), big),
        ]
    return [*out, ("output_norm.weight", (HIDDEN,), "F32"), ("output.weight", (VOCAB, HIDDEN), "Q6_K")]


def write(path: Path) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from levante.loader import demo_model_path
    from levante.testing.checkpoints import random_blocks
    from levante.weights.gguf_file import read_gguf

    vocab = read_gguf(demo_model_path()).metadata
    w = GGUFWriter(path, "llama")
    w.add_name("levante scale benchmark: random weights, Mistral Small 3.2 text shapes")
    w.add_context_length(131072)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1e9)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(FILE_TYPE_Q4_K_M)
    tokens = list(vocab["tokenizer.ggml.tokens"])
    types = list(vocab["tokenizer.ggml.token_type"])
    pad = VOCAB - len(tokens)
    w.add_tokenizer_model(vocab["tokenizer.ggml.model"])
    w.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
    w.add_token_list(tokens + [f"<pad_{i}>" for i in range(pad)])
    w.add_token_types(types + [5] * pad)  # UNUSED
    w.add_token_merges(list(vocab["tokenizer.ggml.merges"]))
    w.add_bos_token_id(vocab["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(vocab["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(vocab["tokenizer.chat_template"])
    tensors = recipe()
    for name, shape, qtype in tensors:
        t = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(
            name,
            (shape[0], nbytes // shape[0]) if len(shape) == 2 else shape,
            np.dtype(np.uint8 if len(shape) == 2 else np.float32),
            nbytes,
            raw_dtype=t if len(shape) == 2 else None,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, qtype in tensors:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:  # small scales keep activations finite through 40 random layers
            w.write_tensor_data(random_blocks(GGMLQuantizationType[qtype], shape, rng, scale=1e-4))
    w.close()


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def levante(path: Path, prompt_len: int, decode: int, long_prompt: int, long_steps: int) -> dict[str, object]:
    """Runs in its own process (`--levante-child`), so its peak RSS is its own. The KV cache is fp8
    and sized for `long_prompt` tokens, which the last run admits and prefills for `long_steps`
    steps (chunks of 1024 tokens) before aborting it: the whole prompt fits, and the peak RSS says
    at what cost; prefilling all of it would take hours here."""
    import torch

    from levante.engine import Engine, EngineConfig, SamplingParams
    from levante.engine.kv_cache import KVStore
    from levante.loader import load
    from levante.tokenizer import PromptInputs

    start = time.perf_counter()
    loaded = load(path, dtype="auto", progress=False)
    load_s = time.perf_counter() - start
    model = loaded.model
    weights = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    text = model.config.text
    fp8 = torch.float8_e4m3fn
    per_token = KVStore.bytes_per_token(text.num_layers, text.num_kv_heads, text.head_dim, fp8)
    config = EngineConfig(
        kv_cache_memory=(long_prompt + 64) * per_token / 2**30,
        max_num_seqs=1,
        max_model_len=long_prompt + 64,
        kv_cache_dtype="fp8",
    )
    engine = Engine(model, loaded.tokenizer, config)

    def run(prompt: list[int], tokens: int) -> tuple[float, list[int]]:
        engine.add_request(
            "r", PromptInputs(prompt), SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        )
        out: list[int] = []
        t0 = time.perf_counter()
        first = None
        while engine.has_unfinished():
            for o in engine.step():
                out += o.token_ids
            first = first or time.perf_counter()
        return (time.perf_counter() - (first or t0)), out

    chat = loaded.tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}]
    ).tokens
    _, answer = run(chat, 8)
    prompt = torch.randint(1000, 40000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    run(prompt, 1)
    prefill_s = time.perf_counter() - t0
    decode_s, _ = run(prompt[:16], decode + 1)  # time after the first token: decode steps only
    long = torch.randint(1000, 40000, (long_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("long", PromptInputs(long), SamplingParams(temperature=0, max_tokens=1))
    t0 = time.perf_counter()
    for _ in range(long_steps):
        engine.step()
    long_s = time.perf_counter() - t0
    engine.abort("long")
    return {
        "load_s": round(load_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_gib": round(rss_now() / 2**30, 2),
        "weights_gib": round(weight_bytes / 2**30, 2),
        "dtype": str(model.decoder.norm.weight.dtype),
        "chat_tokens": answer,
        "prefill_tok_s": round(prompt_len / prefill_s, 2),
        "decode_tok_s": round(decode / decode_s, 3),
        "long_prompt_admitted": long_prompt,
        "long_prompt_tok_s_first_steps": round(long_steps * config.max_num_batched_tokens / long_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=32768, help="tokens the fp8 KV cache is sized for")
    ap.add_argument("--long-steps", type=int, default=2, help="prefill steps run on the long prompt")
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary, run on the same file")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF file")
    ap.add_argument("--levante-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.levante_child:
        a = args
        result = levante(a.levante_child, a.prompt_len, a.decode_tokens, a.long_prompt, a.long_steps)
        print(json.dumps(result))
        return
    path = args.dir / "mistral-small-3.2-shapes-Q4_K_M.gguf"
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    try:
        start = time.perf_counter()
        write(path)
        print(
            f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        child = [sys.executable, __file__, "--levante-child", str(path), "--prompt-len", str(args.prompt_len)]
        child += ["--decode-tokens", str(args.decode_tokens), "--long-prompt", str(args.long_prompt)]
        child += ["--long-steps", str(args.long_steps)]
        done = subprocess.run(child, capture_output=True, text=True)
        print("levante:", done.stdout.strip() or done.stderr[-3000:], flush=True)
        if args.llama_bench:
            bench = [
                str(args.llama_bench),
                "-m",
                str(path),
                "-p",
                str(args.prompt_len),
                "-n",
                "16",
                "-t",
                "2",
            ]
            done = subprocess.run(bench, capture_output=True, text=True)
            print("llama-bench:\n" + (done.stdout or done.stderr[-3000:]), flush=True)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
