"""The model against transformers on tiny random checkpoints, and incremental = full prefill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
from PIL import Image

from levante.loader import load_model
from levante.model import Model
from levante.reference import DenseKVCache, generate_tokens, image_embeddings
from levante.testing.checkpoints import TinySpec, random_weights, write_hf, write_mistral

IMG, IMG_BREAK, IMG_END = 10, 12, 13


def forward_batch(
    model: Model, seqs: list[list[int]], images: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Logits of several whole sequences run as ONE flat batch, no padding."""
    cache = DenseKVCache(len(model.decoder.layers))
    cache.plan(range(len(seqs)), [len(s) for s in seqs])
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad():
        return model.logits(model(ids, positions, cache, image_embeddings(model, images or [])))


def image_prompt(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Text with images between, each preprocessed by mistral-common (the reference) into its
    [IMG]/[IMG_BREAK]/[IMG_END] tokens and a normalized (C, H, W) array."""
    rng = np.random.default_rng(seed)
    encoder = ImageEncoder(ImageConfig(14, 1540, 2), SpecialImageIDs(IMG, IMG_BREAK, IMG_END))
    tokens, arrays = [1, 3, 500], []
    for w, h in sizes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        enc = encoder(ImageChunk(image=Image.fromarray(pixels)))
        tokens += [*enc.tokens, 600 + w % 97, 700 + h % 89]
        arrays.append(torch.from_numpy(enc.image))
    return [*tokens, 4], arrays


def hf_vision_logits(ref: torch.nn.Module, tokens: list[int], images: list[torch.Tensor]) -> torch.Tensor:
    sizes = [img.shape[1:] for img in images]
    pixels = torch.zeros(len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for i, img in enumerate(images):
        pixels[i, :, : img.shape[1], : img.shape[2]] = img
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([tokens]), pixel_values=pixels, image_sizes=torch.tensor(sizes))
    return out.logits[0]


def test_text_logits_match_transformers_in_one_flat_batch(hf_text: tuple[Path, torch.nn.Module]) -> None:
    path, ref = hf_text
    model = load_model(path, progress=False)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 17, 33)]
    ours = forward_batch(model, seqs)
    with torch.no_grad():
        theirs = torch.cat([ref(torch.tensor([s])).logits[0] for s in seqs])
    assert ours.abs().max() > 1.0  # logits are not all ~0, so the tolerance below means something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_continuation_matches_transformers(hf_text: tuple[Path, torch.nn.Module]) -> None:
    path, ref = hf_text
    model = load_model(path, progress=False)
    prompt = [1, 17, 230, 999, 42, 7, 7, 311]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ours = [t for t, _ in generate_tokens(model, prompt, max_tokens=32)]
    assert ours == expected[0, len(prompt) :].tolist()


def test_vision_logits_match_transformers(hf_mm: tuple[Path, torch.nn.Module]) -> None:
    path, ref = hf_mm
    model = load_model(path, progress=False)
    tokens, images = image_prompt([(28, 28), (100, 60), (300, 200)])
    assert [img.shape[1:] for img in images] == [(28, 28), (84, 112), (224, 308)]
    ours = forward_batch(model, [tokens], images)
    torch.testing.assert_close(ours, hf_vision_logits(ref, tokens, images), atol=1e-4, rtol=0)
    # the images really flow into the text: other pixels, other logits after the first image
    _, other = image_prompt([(28, 28), (100, 60), (300, 200)], seed=1)
    assert (forward_batch(model, [tokens], other)[-1] - ours[-1]).abs().max() > 1e-2


def test_mixed_prefill_and_decode_in_one_forward(hf_mm: tuple[Path, torch.nn.Module]) -> None:
    """A decode step of one sequence and the whole prefill of another, with an image, in one
    forward give the same logits as running each alone — what continuous batching relies on."""
    model = load_model(hf_mm[0], progress=False)
    a = [1, 5, 6, 7, 8, 9, 20]
    b, images = image_prompt([(100, 60)])
    alone_a, alone_b = forward_batch(model, [a])[-1], forward_batch(model, [b], images)[-1]

    cache = DenseKVCache(len(model.decoder.layers))
    cache.plan([0], [len(a) - 1])
    with torch.no_grad():
        model(torch.tensor(a[:-1]), torch.arange(len(a) - 1), cache)
        cache.plan([0, 1], [1, len(b)])
        ids = torch.tensor([a[-1], *b])
        positions = torch.tensor([len(a) - 1, *range(len(b))])
        logits = model.logits(model(ids, positions, cache, image_embeddings(model, images)))
    torch.testing.assert_close(logits[0], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[-1], alone_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_images", [False, True])
def test_incremental_equals_full_prefill(hf_mm: tuple[Path, torch.nn.Module], with_images: bool) -> None:
    model = load_model(hf_mm[0], progress=False)
    prompt, images = image_prompt([(56, 84), (100, 60)]) if with_images else ([1, 3, 44, 55, 66, 4], [])
    steps = list(generate_tokens(model, prompt, images=images, max_tokens=24, temperature=1.0, seed=3))
    out = [t for t, _ in steps]
    full = torch.log_softmax(forward_batch(model, [prompt + out], images), dim=-1)
    rows = full[len(prompt) - 1 : -1]
    expected = rows[torch.arange(len(out)), torch.tensor(out)]
    torch.testing.assert_close(torch.tensor([lp for _, lp in steps]), expected, atol=1e-4, rtol=0)


def test_demo_gguf_greedy_matches_transformers(demo_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=demo_gguf.name)
    tok = AutoTokenizer.from_pretrained(demo_gguf.parent, **kw)
    ref = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, dtype=torch.float32, **kw).eval()
    # dequantized at load, as transformers does: the architecture against the reference; the
    # quantized matmul (int8 activations) against this path is test_quantized's
    model = load_model(demo_gguf, progress=False, quantized=False)
    for question in (
        "What is the capital of France?",
        "Write a haiku about rain.",
        "List three prime numbers.",
    ):
        messages = [{"role": "user", "content": question}]
        prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :]
        ours = [
            t
            for t, _ in generate_tokens(model, prompt, max_tokens=32, stop_ids=frozenset({tok.eos_token_id}))
        ]
        assert len(ours) >= 8, "the demo model should answer with more than a few tokens"
        assert ours == expected.tolist(), question


def test_hf_and_mistral_native_layouts_give_the_same_logits(tmp_path: Path) -> None:
    spec = TinySpec(dtype=torch.float32)
    weights = random_weights(spec, seed=11)
    hf = load_model(write_hf(tmp_path / "hf", weights, spec), progress=False)
    native = load_model(write_mistral(tmp_path / "native", weights, spec), progress=False)
    tokens, images = image_prompt([(100, 60), (28, 56)])
    ours_hf, ours_native = forward_batch(hf, [tokens], images), forward_batch(native, [tokens], images)
    assert ours_hf.abs().max() > 1.0
    torch.testing.assert_close(ours_native, ours_hf, atol=1e-6, rtol=0)
