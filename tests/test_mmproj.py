"""`--mmproj`: a GGUF text model plus llama.cpp's mmproj file for Pixtral (the way llama.cpp ships
Mistral Small 3.2's vision) must be the same model as the HF checkpoint the weights came from:
the same logits and greedy tokens with an image, float32, with the tokenizer of the original
repository (`--tokenizer`); and clear errors for files that do not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from PIL import Image
from test_tensor_parallel import ENGINE, probe, prompts

from levante.cli import main
from levante.engine import LLM
from levante.errors import CheckpointError, TokenizerError
from levante.loader import demo_model_path, load_model
from levante.model.quantized import QuantLinear
from levante.testing.checkpoints import TinySpec, gguf_tensors, random_weights, write_gguf, write_mmproj
from levante.tokenizer import load_tokenizer

SPEC = TinySpec(dtype=torch.float32)  # the tiny_mistral fixture's spec and seed
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model's text weights as a GGUF, its vision weights as mmproj files in F32 and Q8_0."""
    weights, directory = random_weights(SPEC, 0), tmp_path_factory.mktemp("mmproj")
    img_break = weights["decoder.embed_tokens.weight"][12]
    return {
        "text": write_gguf(directory / "tiny.gguf", SPEC, gguf_tensors(weights, SPEC)),
        "f32": write_mmproj(directory / "mmproj-f32.gguf", weights, SPEC, Q.F32, img_break),
        "q8_0": write_mmproj(directory / "mmproj-q8_0.gguf", weights, SPEC, Q.Q8_0, img_break),
    }


def test_gguf_plus_mmproj_is_the_hf_model_with_an_image(tiny_mistral: Path, files: dict[str, Path]) -> None:
    """The tensor-parallel tests' probe: an image request and a text one batched, greedy."""
    want = probe(LLM(tiny_mistral, engine=ENGINE), with_image=True)
    llm = LLM(files["text"], mmproj=files["f32"], tokenizer=tiny_mistral, engine=ENGINE)
    model = llm.engine.model
    assert model.config.architecture == "Mistral3ForConditionalGeneration" and model.vision is not None
    got = probe(llm, with_image=True)
    assert got["tokens"] == want["tokens"]
    torch.testing.assert_close(torch.cat(got["logits"]), torch.cat(want["logits"]), rtol=0, atol=1e-5)


def test_an_mmproj_for_another_text_model_is_refused_naming_the_tensor(
    files: dict[str, Path], tmp_path: Path
) -> None:
    wider = TinySpec(dtype=torch.float32, hidden_size=96)
    other = write_mmproj(tmp_path / "mmproj-wider.gguf", random_weights(wider, 0), wider)
    shape = r"tensor 'mm\.1\.weight' has shape \(96, 64\), the model expects \(64, 64\)"
    with pytest.raises(CheckpointError, match=shape):
        load_model(files["text"], mmproj=other, progress=False)


def test_a_quantized_mmproj_stays_quantized_and_stays_close(
    tiny_mistral: Path, files: dict[str, Path]
) -> None:
    dense = load_model(files["text"], mmproj=files["f32"], progress=False)
    quant = load_model(files["text"], mmproj=files["q8_0"], progress=False)
    assert quant.vision is not None and any(isinstance(m, QuantLinear) for m in quant.vision.modules())
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 56, 84)).astype(np.float32))
    with torch.inference_mode():
        want, got = (m.encode_images([pixels])[0] for m in (dense, quant))
    error = float((got - want).norm() / want.norm())
    assert error < 0.04, error  # Q8_0 on random Gaussian weights: measured 0.024


def test_the_cli_answers_about_an_image_from_gguf_files(
    tiny_mistral: Path, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(picture)
    common = ["--prompt", "What is in the picture?", "--image", str(picture), "--max-tokens", "5"]
    common += ["--dtype", "float32", "--tokenizer", str(tiny_mistral)]
    assert main(["generate", "--model", str(tiny_mistral), *common]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--model", str(files["text"]), "--mmproj", str(files["f32"]), *common]) == 0
    assert capsys.readouterr().out == want


def test_files_that_do_not_fit_are_refused_by_name(tiny_mistral: Path, files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"not a Pixtral mmproj GGUF \(architecture 'llama'"):
        load_model(files["text"], mmproj=files["text"], progress=False)
    with pytest.raises(CheckpointError, match=r"goes with a \.gguf model"):
        load_model(tiny_mistral, mmproj=files["f32"], progress=False)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(files["text"], mmproj=files["f32"].with_name("missing.gguf"), progress=False)
    # a GGUF's own vocabulary (here the demo model's) has no image support: an image request says so
    with pytest.raises(TokenizerError, match="no image support"):
        load_tokenizer(demo_model_path()).encode_chat(prompts(with_image=True)[0])
