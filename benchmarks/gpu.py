"""Decode speed of Mistral Small 3.2's text architecture with random weights, against the memory
bandwidth of the device that runs it.

The 24B shape (40 layers, hidden 5120, 32 query heads of 128 over 8 KV heads, MLP 32768, vocab
131072) in bfloat16 (~47 GB) or int4 (random Q4_0 blocks, the LM head Q8_0: ~14 GB; tinygemm int4 and
int8 per row on CUDA, Levante's kernels on CPU), served by the same engine `levante serve` runs
(compiled, CUDA graphs on a GPU, unless --enforce-eager). For one stream and for 64 it prints decode
tok/s and the share of the memory bandwidth the step reaches: the bytes of weights a step reads
(every projection and the LM head) over the step's time, against the rate a plain read of
1 GiB reaches here (or --bandwidth). `--config tiny` is the same code in seconds on CPU; the test
suite runs it.

    python benchmarks/gpu.py --device cuda                    # bfloat16, one H100 80GB
    python benchmarks/gpu.py --device cuda --weights int4
    python benchmarks/gpu.py --config tiny --device cpu --tokens 8 --streams 1 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from levante.config import ModelConfig, TextConfig
from levante.engine import EngineConfig, SamplingParams
from levante.engine.engine import Engine
from levante.model import build_model
from levante.model.quantized import QuantizedTensor
from levante.model.weight_only import use_weight_only_kernels
from levante.testing.checkpoints import random_blocks
from levante.testing.tekken import write_tekken
from levante.tokenizer import PromptInputs, load_tokenizer
from levante.weights.checkpoint import Checkpoint
from levante.weights.loader import load_weights

CONFIGS = {
    "24b": TextConfig(5120, 40, 32, 8, 128, 32768, 131072, 1e-5, 1e9, 131072, False),
    "tiny": TextConfig(256, 2, 4, 2, 64, 512, 131072, 1e-5, 1e9, 4096, False),
}
PROMPT = 32  # prompt tokens per stream


class RandomWeights:
    """A checkpoint's tensors (HF names) made on the fly: bfloat16 N(0, 0.02²) on the device, or for
    int4 the projections as random Q4_0 blocks and the LM head as Q8_0."""

    def __init__(self, cfg: TextConfig, int4: bool, device: str, seed: int = 0) -> None:
        self.cfg, self.int4, self.device = cfg, int4, device
        self.rng, self.gen = np.random.default_rng(seed), torch.Generator(device).manual_seed(seed)

    def _shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        c = self.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        yield "model.embed_tokens.weight", (c.vocab_size, c.hidden_size)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (c.hidden_size,)
            yield p + "post_attention_layernorm.weight", (c.hidden_size,)
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                yield p + f"self_attn.{name}_proj.weight", (rows, c.hidden_size)
            yield p + "self_attn.o_proj.weight", (c.hidden_size, q)
            yield p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)
            yield p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)
            yield p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)
        yield "model.norm.weight", (c.hidden_size,)
        yield "lm_head.weight", (c.vocab_size, c.hidden_size)

    def files(self) -> tuple[Path, ...]:
        return (Path("random"),)

    def names(self) -> list[str]:
        return [name for name, _ in self._shapes()]

    def __iter__(self) -> Iterator[tuple[str, Path, torch.Tensor | QuantizedTensor]]:
        for name, shape in self._shapes():
            if len(shape) == 1:
                yield name, Path("random"), torch.ones(shape, device=self.device)
            elif self.int4 and "embed" not in name:
                qtype = GGMLQuantizationType.Q8_0 if name == "lm_head.weight" else GGMLQuantizationType.Q4_0
                blocks = torch.from_numpy(random_blocks(qtype, shape, self.rng))  # type: ignore[arg-type]
                yield name, Path("random"), QuantizedTensor(blocks, int(qtype), shape[1])
            else:
                w = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.bfloat16)
                yield name, Path("random"), w * 0.02


def weight_bytes(engine: Engine) -> int:
    """Bytes a decode step reads of weights: every projection and the LM head (the embedding table
    is only looked up), in whatever form the engine holds them (packed for a kernel, quantized)."""
    decoder = engine.model.decoder
    seen: dict[int, int] = {}
    for top in [*decoder.layers, decoder.lm_head]:
        for module in top.modules():
            held = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
            for t in held:
                if isinstance(t, torch.Tensor):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def bandwidth(device: torch.device) -> float:
    """Bytes per second a plain read of 1 GiB reaches here (a max over float32 values), best of six.
    The values are written first: a tensor never touched reads the kernel's one zero page, from
    the caches, at several times the memory's rate."""
    return read_rate(torch.rand(1 << 28, device=device))


def read_rate(x: torch.Tensor, repeats: int = 6) -> float:
    """Bytes per second of `x.amax()`, the best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        x.amax()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def decode(engine: Engine, streams: int, tokens: int, vocab: int) -> float:
    """Seconds per decode step with `streams` requests in flight: the time from every request's
    first token to their last, over the steps between."""
    rng = np.random.default_rng(streams)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(streams):
        prompt = rng.integers(1000, vocab, PROMPT).tolist()
        engine.add_request(f"s{streams}-{i}", PromptInputs(tokens=prompt), params)
    started: set[str] = set()
    start = None
    while engine.has_unfinished():
        for delta in engine.step():
            started.add(delta.request_id)
        if start is None and len(started) == streams:
            start = time.perf_counter()
    assert start is not None
    return (time.perf_counter() - start) / (tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="24b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", choices=["bfloat16", "int4"], default="bfloat16")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=64, help="decoded per stream")
    ap.add_argument(
        "--bandwidth", type=float, help="GB/s to compare with (default: measured by a 1 GiB read)"
    )
    ap.add_argument("--kv-cache-memory", type=float, default=4.0, help="GiB")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()

    cfg, device = CONFIGS[args.config], torch.device(args.device)
    config = ModelConfig(text=cfg, layout="hf", architecture="MistralForCausalLM")
    source = RandomWeights(cfg, args.weights == "int4", args.device)
    with torch.device("meta"):
        model = build_model(config)
    start = time.perf_counter()
    load_weights(model, Checkpoint(Path("random"), config, source), torch.bfloat16, device, progress=False)
    model.prepare()
    if args.weights == "int4" and device.type == "cuda":
        use_weight_only_kernels(model, device)
    with tempfile.TemporaryDirectory() as vocab:
        write_tekken(vocab)
        tokenizer = load_tokenizer(vocab)
    engine_config = EngineConfig(
        max_num_seqs=max(args.streams),
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=PROMPT + args.tokens + 16,
        max_num_batched_tokens=max(args.streams) * PROMPT,
        compile=not args.enforce_eager,
    )
    engine = Engine(model.eval(), tokenizer, engine_config)
    ready = time.perf_counter() - start
    read = weight_bytes(engine)
    peak = args.bandwidth * 1e9 if args.bandwidth else bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.config} {args.weights} on {name}: {read / 1e9:.2f} GB of weights per step", end="")
    print(f"; ready in {ready:.0f} s")
    print(f"memory bandwidth {peak / 1e9:.0f} GB/s ({'given' if args.bandwidth else 'a 1 GiB read'})")
    for streams in args.streams:
        step = decode(engine, streams, args.tokens, cfg.vocab_size)
        share = read / step / peak
        print(
            f"{streams:3d} streams: {streams / step:9.1f} tok/s, {step * 1e3:7.2f} ms/step, "
            f"weights read at {read / step / 1e9:7.1f} GB/s = {share:.0%} of the bandwidth"
        )


if __name__ == "__main__":
    main()
