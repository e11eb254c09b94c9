"""Checkpoint readers against each other, against transformers (which reads HF and GGUF files
itself) and against gguf's reference dequantization, on tiny synthetic checkpoints in the real
formats and on the demo GGUF; plus the loader's errors on broken input."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

from levante.config import Layout, from_hf
from levante.errors import CheckpointError
from levante.model import build_model
from levante.testing.checkpoints import (
    QUANT_MIX_SPEC,
    TinySpec,
    Weights,
    gguf_tensors,
    hf_config,
    quant_mix_tensors,
    random_weights,
    write_gguf,
    write_hf,
    write_mistral,
)
from levante.weights import Checkpoint, load_weights, open_checkpoint
from levante.weights.gguf_file import SUPPORTED_TYPES
from levante.weights.names import internal_name

Q = GGMLQuantizationType
SPEC = TinySpec()
TEXT_SPEC = TinySpec(vision=False)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return random_weights(SPEC, seed=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, weights: Weights) -> dict[str, Path]:
    """The same weights in every layout; "both" holds the HF and the Mistral-native set."""
    root = tmp_path_factory.mktemp("ckpts")
    text = random_weights(TEXT_SPEC, seed=1)
    return {
        "hf_new": write_hf(root / "hf_new", weights, SPEC, prefix="new"),
        "hf_old": write_hf(root / "hf_old", weights, SPEC, prefix="old"),
        "hf_sharded": write_hf(root / "hf_sharded", weights, SPEC, prefix="old", shards=2),
        "hf_text": write_hf(root / "hf_text", text, TEXT_SPEC),
        "mistral": write_mistral(root / "mistral", weights, SPEC),
        "both": write_mistral(write_hf(root / "both", weights, SPEC, shards=2), weights, SPEC),
        "gguf": write_gguf(root / "tiny.gguf", SPEC, gguf_tensors(weights, SPEC)),
    }


def read_all(path: Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    checkpoint = open_checkpoint(path)
    return checkpoint, dict(checkpoint.tensors())


def assert_same(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and values, compared exactly in float32."""
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ours[name].float(), t.float()), name


def decoder_only(weights: Weights) -> Weights:
    return {k: v for k, v in weights.items() if k.startswith("decoder.")}


# --- the layouts agree --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf_new", "hf_old", "hf_sharded", "mistral"])
def test_every_layout_yields_the_same_tensors_and_config(
    ckpts: dict[str, Path], weights: Weights, layout: str
) -> None:
    checkpoint, tensors = read_all(ckpts[layout])
    assert_same(tensors, weights)
    expected_layout = "mistral" if layout == "mistral" else "hf"
    assert checkpoint.config == dataclasses.replace(SPEC.model_config(), layout=expected_layout)


def test_text_only_hf_checkpoint(ckpts: dict[str, Path]) -> None:
    checkpoint, tensors = read_all(ckpts["hf_text"])
    assert_same(tensors, random_weights(TEXT_SPEC, seed=1))
    assert checkpoint.config == TEXT_SPEC.model_config()


def _rope_scores(
    wq: torch.Tensor, wk: torch.Tensor, heads: int, kv_heads: int, interleaved: bool
) -> torch.Tensor:
    """Attention scores q·k of 6 random tokens after RoPE, written out independently: complex
    pairs (2i, 2i+1) as Mistral's reference code applies it, or rotate-half (i, i + d/2) as HF."""
    d = wq.shape[0] // heads
    x = torch.randn(6, wq.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles = torch.arange(6, dtype=torch.float64)[:, None] / 100 ** (torch.arange(0, d, 2) / d)

    def rope(v: torch.Tensor) -> torch.Tensor:
        if interleaved:
            pairs = torch.view_as_complex(v.reshape(*v.shape[:-1], d // 2, 2).contiguous())
            turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None]
            return torch.view_as_real(turned).flatten(-2)
        a, b = v[..., : d // 2], v[..., d // 2 :]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    q = rope((x @ wq.double().T).view(6, heads, d))
    k = rope((x @ wk.double().T).view(6, kv_heads, d)).repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


@pytest.mark.parametrize(
    ("native", "hf", "heads", "kv_heads"),
    [
        ("layers.1.attention.w{}.weight", "decoder.layers.1.self_attn.{}_proj.weight", 4, 2),
        (
            "vision_encoder.transformer.layers.0.attention.w{}.weight",
            "vision.layers.0.attention.{}_proj.weight",
            4,
            4,
        ),
    ],
)
def test_native_qk_rows_suit_interleaved_rope(
    ckpts: dict[str, Path], weights: Weights, native: str, hf: str, heads: int, kv_heads: int
) -> None:
    """The direction of the permutation, checked by what it is for: native q/k under
    interleaved RoPE attend exactly like HF q/k under rotate-half RoPE."""
    files = load_file(ckpts["mistral"] / "consolidated.safetensors")
    nq, nk = files[native.format("q")], files[native.format("k")]
    hq, hk = weights[hf.format("q")], weights[hf.format("k")]
    reference = _rope_scores(hq, hk, heads, kv_heads, interleaved=False)
    torch.testing.assert_close(_rope_scores(nq, nk, heads, kv_heads, interleaved=True), reference)
    assert not torch.allclose(_rope_scores(nq, nk, heads, kv_heads, interleaved=False), reference)


@pytest.mark.parametrize(
    ("files", "layout", "reason"),
    [
        (("params.json", "consolidated.safetensors", "config.json", "model*"), "mistral", "both present"),
        (("params.json", "config.json", "model*"), "hf", "consolidated.safetensors is not"),
        (("config.json", "model*", "consolidated.safetensors"), "hf", "params.json is not"),
    ],
)
def test_a_directory_with_both_sets_loads_one_and_says_which(
    ckpts: dict[str, Path],
    weights: Weights,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    files: tuple[str, ...],
    layout: str,
    reason: str,
) -> None:
    for pattern in files:
        for f in ckpts["both"].glob(pattern):
            shutil.copy(f, tmp_path)
    with caplog.at_level(logging.INFO, logger="levante.weights"):
        checkpoint, tensors = read_all(tmp_path)
    assert checkpoint.config.layout == layout
    wanted = (
        {"consolidated.safetensors"}
        if layout == "mistral"
        else {f"model-0000{i}-of-00002.safetensors" for i in (1, 2)}
    )
    assert {f.name for f in checkpoint.source.files()} == wanted
    assert_same(tensors, weights)
    (record,) = [r for r in caplog.records if r.name == "levante.weights"]
    assert ("Mistral-native" if layout == "mistral" else "HF") in record.getMessage()
    assert reason in record.getMessage()


@pytest.mark.parametrize("spec", [TinySpec(rope_theta=5e8, vision_rope_theta=2e4), TinySpec(vision=False)])
def test_a_config_saved_by_transformers_reads_the_same(tmp_path: Path, spec: TinySpec) -> None:
    """transformers 5 rewrites config.json (θ nested in `rope_parameters`, Pixtral's as type
    "axial"); non-default θs show neither is silently replaced by a default."""
    from transformers import Mistral3Config, MistralConfig

    (Mistral3Config if spec.vision else MistralConfig).from_dict(hf_config(spec)).save_pretrained(tmp_path)
    assert from_hf(tmp_path / "config.json") == spec.model_config()


@pytest.mark.parametrize("files_tied", [True, False])
def test_the_files_decide_whether_the_lm_head_is_tied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, files_tied: bool
) -> None:
    """As transformers 5 does: its Mistral3 configs carry a top-level flag that defaults to true
    while transformers 4 read text_config's, so the flag alone cannot be trusted."""
    spec = TinySpec(vocab_size=256, tie_word_embeddings=files_tied)
    w = random_weights(spec)
    config = json.loads((write_hf(tmp_path, w, spec) / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = not files_tied
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="levante.weights"):
        checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.config.text.tie_word_embeddings == files_tied
    assert "going by the files" in caplog.text
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    load_weights(model, checkpoint, torch.float32, "cpu", progress=False)
    head = "decoder.embed_tokens.weight" if files_tied else "decoder.lm_head.weight"
    assert (model.decoder.lm_head.weight is model.decoder.embed_tokens.weight) == files_tied
    assert torch.equal(model.decoder.lm_head.weight, w[head].float())


# --- the files are real: transformers reads them ------------------------------------------


@pytest.mark.parametrize("layout", ["hf_new", "hf_old", "hf_sharded", "hf_text"])
def test_transformers_loads_the_hf_files_to_the_same_tensors(ckpts: dict[str, Path], layout: str) -> None:
    from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM

    cls = MistralForCausalLM if layout == "hf_text" else Mistral3ForConditionalGeneration
    ref = cls.from_pretrained(ckpts[layout]).state_dict()
    _, ours = read_all(ckpts[layout])
    assert_same(ours, {internal_name("hf", k): v for k, v in ref.items()})


def test_tiny_gguf_matches_transformers_and_the_source_weights(
    ckpts: dict[str, Path], weights: Weights
) -> None:
    """transformers undoes llama.cpp's q/k permutation itself: agreeing with it fixes the
    direction of ours, and agreeing with the source weights shows the writer is llama.cpp's."""
    from transformers import AutoModelForCausalLM

    path = ckpts["gguf"]
    checkpoint, ours = read_all(path)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    assert_same(ours, {internal_name("hf", k): v for k, v in ref.items()})
    assert_same(ours, decoder_only(weights))
    text = checkpoint.config.text
    assert text.rms_norm_eps == pytest.approx(SPEC.rms_norm_eps)  # stored as float32
    assert dataclasses.replace(text, rms_norm_eps=SPEC.rms_norm_eps) == SPEC.model_config().text
    assert checkpoint.config.architecture == "LlamaForCausalLM" and checkpoint.config.vision is None


def test_demo_gguf_matches_transformers_dequantization(demo_gguf: Path) -> None:
    """SmolLM2-135M-Instruct (Q4_1, Q8_0 and F32 tensors) against transformers' own GGUF reader
    (what `from_pretrained(gguf_file=...)` calls), given a skeleton on meta only to map names:
    a whole from_pretrained reads the file twice and doubles the test's time."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    checkpoint, ours = read_all(demo_gguf)
    t = checkpoint.config.text
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=t.hidden_size,
                num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads,
                intermediate_size=t.intermediate_size,
                vocab_size=t.vocab_size,
                tie_word_embeddings=True,
            )
        )
    ref = load_gguf_checkpoint(str(demo_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert t.tie_word_embeddings and "decoder.lm_head.weight" not in ours
    # Both dequantize with gguf's code, so "within tolerance" is in fact exact.
    assert_same(ours, {internal_name("hf", k): v for k, v in ref.items()})


# --- GGUF quantization types ---------------------------------------------------------------


def test_every_supported_quant_type_dequantizes_like_gguf_and_transformers(tmp_path: Path) -> None:
    """One tensor per type, including K-quants (256-wide blocks, so a wider model), q and k among
    them so the permutation runs on dequantized values."""
    w, tensors = quant_mix_tensors()
    path = write_gguf(tmp_path / "quants.gguf", QUANT_MIX_SPEC, tensors)

    _, ours = read_all(path)
    assert {qtype for _, qtype in tensors.values()} == SUPPORTED_TYPES
    for name, (data, qtype) in tensors.items():
        got = ours[_internal("gguf", name)]
        assert got.dtype == torch.float32 and got.shape == w[_internal("gguf", name)].shape
        assert torch.isfinite(got).all()
        if "attn_q" not in name and "attn_k" not in name:
            assert torch.equal(got, torch.from_numpy(dequantize(data, qtype))), name

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    assert_same(ours, {internal_name("hf", k): v for k, v in ref.items()})


def _internal(layout: Layout, name: str) -> str:
    found = internal_name(layout, name)
    assert found is not None
    return found


# --- load_weights into the real model -------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf_sharded", "mistral", "gguf"])
def test_load_weights_fills_the_model_built_on_meta(
    ckpts: dict[str, Path], weights: Weights, layout: str
) -> None:
    checkpoint = open_checkpoint(ckpts[layout])
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    load_weights(model, checkpoint, dtype=torch.float32, device="cpu", progress=False)
    params = dict(model.named_parameters())
    expected = decoder_only(weights) if layout == "gguf" else weights
    assert_same(params, expected)
    assert all(
        p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad for p in params.values()
    )


def test_load_weights_takes_a_path_ties_the_head_and_converts_the_dtype(tmp_path: Path) -> None:
    spec = TinySpec(vision=False, tie_word_embeddings=True, vocab_size=256)
    w = random_weights(spec)
    assert "decoder.lm_head.weight" not in w
    with torch.device("meta"):
        model = build_model(spec.model_config())
    load_weights(
        model, write_hf(tmp_path, w, spec), dtype=torch.float16, device=torch.device("cpu"), progress=False
    )
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert torch.equal(model.decoder.lm_head.weight, w["decoder.embed_tokens.weight"].half())


# --- broken input: one clear line that starts with the file at fault ------------------------

SMALL = TinySpec(vocab_size=256)


def _hf(path: Path, shards: int = 1) -> Path:
    return write_hf(path, random_weights(SMALL), SMALL, shards=shards)


def _gguf(path: Path, matrix_type: GGMLQuantizationType = Q.F32) -> Path:
    w = random_weights(dataclasses.replace(SMALL, vision=False))
    return write_gguf(path / "m.gguf", SMALL, gguf_tensors(w, SMALL, matrix_type))


def _truncated(file: Path) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) * 9 // 10])
    return file


def _nonexistent(p: Path) -> tuple[Path, Path]:
    return p / "nowhere", p / "nowhere"


def _truncated_safetensors(p: Path) -> tuple[Path, Path]:
    return p, _truncated(_hf(p) / "model.safetensors")


def _truncated_gguf(p: Path) -> tuple[Path, Path]:
    return (path := _truncated(_gguf(p))), path


def _garbage_gguf(p: Path) -> tuple[Path, Path]:
    (path := p / "x.gguf").write_bytes(b"GGUF" + bytes(60))
    return path, path


def _unsupported_gguf_type(p: Path) -> tuple[Path, Path]:
    return (path := _gguf(p, Q.Q5_0)), path


def _no_config(p: Path) -> tuple[Path, Path]:
    (_hf(p) / "config.json").unlink()
    return p, p


def _missing_weight_file(p: Path) -> tuple[Path, Path]:
    (_hf(p) / "model.safetensors").unlink()
    return p, p / "model.safetensors"


def _missing_shard(p: Path) -> tuple[Path, Path]:
    (_hf(p, shards=2) / "model-00002-of-00002.safetensors").unlink()
    return p, p / "model-00002-of-00002.safetensors"


def _unknown_architecture(p: Path) -> tuple[Path, Path]:
    config = json.loads((_hf(p) / "config.json").read_text())
    (p / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    return p, p / "config.json"


def _not_a_model_file(p: Path) -> tuple[Path, Path]:
    (path := p / "weights.bin").write_bytes(b"x")
    return path, path


BROKEN: dict[str, tuple[Callable[[Path], tuple[Path, Path]], str]] = {
    # case: (make it, returning the path to open and the file at fault; what the message says)
    "nonexistent path": (_nonexistent, "no such file or directory"),
    "truncated safetensors": (_truncated_safetensors, "not a valid safetensors file"),
    "truncated gguf": (_truncated_gguf, "not a valid GGUF file"),
    "garbage gguf": (_garbage_gguf, "not a valid GGUF file"),
    "unsupported gguf type": (_unsupported_gguf_type, "is Q5_0, which is not supported"),
    "no config": (_no_config, "neither config.json (HF) nor params.json (Mistral-native) found"),
    "missing weight file": (_missing_weight_file, "file not found"),
    "missing shard": (_missing_shard, "file not found (listed in model.safetensors.index.json)"),
    "unknown architecture": (_unknown_architecture, "unknown architecture 'GPT2LMHeadModel'"),
    "not a model file": (_not_a_model_file, "expected a model directory or a .gguf file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_fail_to_open_with_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    make, says = BROKEN[case]
    path, at_fault = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"{at_fault}: ") and says in message and "\n" not in message, message


UP_PROJ = "decoder.layers.1.mlp.up_proj.weight"


def _mistral_with_odd_q_rows(path: Path, weights: Weights, spec: TinySpec) -> Path:
    """A q projection no writer could permute, as a hand-edited file might hold."""
    file = write_mistral(path, weights, spec) / "consolidated.safetensors"
    save_file(load_file(file) | {"layers.1.attention.wq.weight": torch.zeros(124, 64)}, file)
    return path


LOAD_ERRORS: dict[str, tuple[Callable[..., Path], str, Callable[[Weights], Weights], str]] = {
    # case: (writer, its weight file, change to the weights, what the message says after the file)
    "wrong shape": (
        write_hf,
        "model.safetensors",
        lambda w: w | {UP_PROJ: torch.zeros(127, 64)},
        "tensor 'model.language_model.layers.1.mlp.up_proj.weight' has shape (127, 64), "
        "the model expects (128, 64)",
    ),
    "q rows that do not split into heads": (
        _mistral_with_odd_q_rows,
        "consolidated.safetensors",
        lambda w: w,
        "tensor 'layers.1.attention.wq.weight' of shape (124, 64) does not split into 4 heads of even size",
    ),
    "unknown tensor": (
        write_hf,
        "model.safetensors",
        lambda w: w | {"decoder.layers.1.mlp.extra.weight": torch.zeros(2)},
        "tensor 'model.language_model.layers.1.mlp.extra.weight' (decoder.layers.1.mlp.extra.weight) "
        "has no place in the Mistral3ForConditionalGeneration model",
    ),
    "name no rule knows": (
        write_mistral,
        "consolidated.safetensors",
        lambda w: w | {"decoder.rope.freqs": torch.zeros(2)},
        "unknown tensor 'rope.freqs' for the Mistral-native layout",
    ),
    "missing tensor": (
        write_hf,
        "",
        lambda w: {k: v for k, v in w.items() if k != UP_PROJ},
        f"no tensor for {UP_PROJ}",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_name_the_file_tensor_and_shapes(tmp_path: Path, case: str) -> None:
    write, file, change, says = LOAD_ERRORS[case]
    path = write(tmp_path, change(random_weights(SMALL)), SMALL)
    checkpoint = open_checkpoint(path)
    with torch.device("meta"):
        model = build_model(checkpoint.config)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, checkpoint, torch.float32, "cpu", progress=False)
    assert str(e.value) == f"{path / file if file else path}: {says}"
