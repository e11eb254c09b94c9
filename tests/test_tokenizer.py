"""Tokenizers against their references: mistral-common (built from its own objects, not through
our OpenAI conversion) on a synthetic Mistral Small 3.2 tekken.json, and transformers on the
demo GGUF. Plus the streaming detokenizer and the errors users see."""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from levante.errors import TokenizerError
from levante.testing.tekken import write_tekken
from levante.tokenizer import PromptInputs, Tokenizer, load_tokenizer
from levante.tokenizer.gguf_vocab import PRE_SPLITS, read_metadata

# ---------------------------------------------------------------- Mistral (Tekken v11)


@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mistral")
    write_tekken(directory)
    return directory


@pytest.fixture(scope="module")
def reference(tekken_dir: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(tekken_dir / "tekken.json")


@pytest.fixture(scope="module")
def mistral(tekken_dir: Path) -> Tokenizer:
    return load_tokenizer(tekken_dir)


def png(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OA_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_SCHEMA},
    },
    {"type": "function", "function": {"name": "get-time", "description": "Local time", "parameters": {}}},
]
MC_TOOLS = [
    Tool(function=Function(name="get_weather", description="Weather now", parameters=WEATHER_SCHEMA)),
    Tool(function=Function(name="get-time", description="Local time", parameters={})),
]


def oa_call(call_id: str, name: str, args: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def mc_call(call_id: str, name: str, args: str) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=args))


IMG_28, IMG_100x60, IMG_300x200 = png(28, 28, 0), png(100, 60, 1), png(300, 200, 2)

# (OpenAI messages, OpenAI tools, the same conversation as mistral-common objects, their tools)
Case = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[Any], list[Tool] | None]
CASES: dict[str, Case] = {
    "single_user": ([{"role": "user", "content": "Hello!"}], None, [UserMessage(content="Hello!")], None),
    "system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
        None,
        [SystemMessage(content="Be brief."), UserMessage(content="Why is the sky blue?")],
        None,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3?"},
        ],
        None,
        [
            SystemMessage(content="You are terse."),
            UserMessage(content="2+2?"),
            AssistantMessage(content="4"),
            UserMessage(content="And times 3?"),
        ],
        None,
    ),
    "merged_users": (
        [{"role": "user", "content": "First part."}, {"role": "user", "content": "Second part."}],
        None,
        [UserMessage(content="First part."), UserMessage(content="Second part.")],
        None,
    ),
    "unicode": (
        [{"role": "user", "content": "Ça va? 日本語で答えて 🙂 — naïve café\n\tend"}],
        None,
        [UserMessage(content="Ça va? 日本語で答えて 🙂 — naïve café\n\tend")],
        None,
    ),
    "tools_available": (
        [{"role": "user", "content": "Weather in Paris?"}],
        OA_TOOLS,
        [UserMessage(content="Weather in Paris?")],
        MC_TOOLS,
    ),
    "tool_round_trip": (
        [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [oa_call("abcDEF123", "get_weather", '{"city": "Paris"}')],
            },
            {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21C."},
            {"role": "user", "content": "And Rome?"},
        ],
        OA_TOOLS,
        [
            SystemMessage(content="SYS"),
            UserMessage(content="Weather in Paris?"),
            AssistantMessage(tool_calls=[mc_call("abcDEF123", "get_weather", '{"city": "Paris"}')]),
            ToolMessage(tool_call_id="abcDEF123", content='{"temp": 21}'),
            AssistantMessage(content="It is 21C."),
            UserMessage(content="And Rome?"),
        ],
        MC_TOOLS,
    ),
    "parallel_calls_end_on_results": (
        [
            {"role": "user", "content": "Weather and time in Oslo?"},
            {
                "role": "assistant",
                "tool_calls": [
                    oa_call("call00001", "get_weather", '{"city": "Oslo"}'),
                    oa_call("call00002", "get-time", "{}"),
                ],
            },
            {"role": "tool", "tool_call_id": "call00001", "content": "rain"},
            {"role": "tool", "tool_call_id": "call00002", "content": "14:05"},
        ],
        OA_TOOLS,
        [
            UserMessage(content="Weather and time in Oslo?"),
            AssistantMessage(
                tool_calls=[
                    mc_call("call00001", "get_weather", '{"city": "Oslo"}'),
                    mc_call("call00002", "get-time", "{}"),
                ]
            ),
            ToolMessage(tool_call_id="call00001", content="rain"),
            ToolMessage(tool_call_id="call00002", content="14:05"),
        ],
        MC_TOOLS,
    ),
    "text_parts": (
        [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
        None,
        [UserMessage(content=[TextChunk(text="one"), TextChunk(text="two")])],
        None,
    ),
    "image_28": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": data_url(IMG_28)}},
                ],
            }
        ],
        None,
        [UserMessage(content=[TextChunk(text="What is this?"), ImageChunk(image=IMG_28)])],
        None,
    ),
    "two_images_one_turn": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMG_300x200)}},
                    {"type": "text", "text": "Compare these."},
                    {"type": "image_url", "image_url": {"url": data_url(IMG_100x60)}},
                ],
            }
        ],
        None,
        [
            UserMessage(
                content=[
                    ImageChunk(image=IMG_300x200),
                    TextChunk(text="Compare these."),
                    ImageChunk(image=IMG_100x60),
                ]
            )
        ],
        None,
    ),
    "image_earlier_turn_with_system_and_tools": (
        [
            {"role": "system", "content": "Describe images."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMG_100x60)}}]},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": "And the weather in Lyon?"},
        ],
        OA_TOOLS,
        [
            SystemMessage(content="Describe images."),
            UserMessage(content=[ImageChunk(image=IMG_100x60)]),
            AssistantMessage(content="Noise."),
            UserMessage(content="And the weather in Lyon?"),
        ],
        MC_TOOLS,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mistral_chat_matches_mistral_common(
    name: str, mistral: Tokenizer, reference: MistralTokenizer
) -> None:
    oa_messages, oa_tools, mc_messages, mc_tools = CASES[name]
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=mc_messages, tools=mc_tools))
    got = mistral.encode_chat(oa_messages, oa_tools)
    assert isinstance(got, PromptInputs)
    assert got.tokens == expected.tokens
    assert len(got.images) == len(expected.images)
    for ours, ref in zip(got.images, expected.images, strict=True):
        assert ours.dtype == np.float32 and ours.ndim == 3 and ours.shape[0] == 3
        np.testing.assert_array_equal(ours, ref)


def test_mistral_rendering_matches_the_facts(mistral: Tokenizer, reference: MistralTokenizer) -> None:
    """The documented v11 layout, spelled out, so a wrong special-token table cannot pass by
    being wrong the same way in both tokenizers."""
    oa_messages, oa_tools, _, _ = CASES["tool_round_trip"]
    got = mistral.encode_chat(oa_messages, oa_tools).tokens
    text = reference.decode(got, special_token_policy=SpecialTokenPolicy.KEEP)
    tools_json = json.dumps(OA_TOOLS)
    assert text == (
        "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]Weather in Paris?[/INST]"
        '[TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{"city": "Paris"}</s>'
        '[TOOL_RESULTS]abcDEF123[TOOL_CONTENT]{"temp": 21}[/TOOL_RESULTS]It is 21C.</s>'
        f"[AVAILABLE_TOOLS]{tools_json}[/AVAILABLE_TOOLS][INST]And Rome?[/INST]"
    )
    assert got[:2] == [1, 17] and got[-1] == 4
    assert 32 in got and 33 in got  # [ARGS], [CALL_ID]


def test_mistral_image_tokens(mistral: Tokenizer) -> None:
    """100×60 → 4 columns × 3 rows of [IMG] with row breaks, the last one [IMG_END]."""
    assert mistral.image_token_id == 10
    got = mistral.encode_chat(CASES["two_images_one_turn"][0])
    second = got.tokens[got.tokens.index(13) + 1 :]  # after the first image's [IMG_END]
    start = second.index(10)
    assert second[start : start + 15] == [10, 10, 10, 10, 12] * 2 + [10, 10, 10, 10, 13]
    assert [img.shape for img in got.images] == [(3, 224, 308), (3, 84, 112)]


def test_mistral_basics(mistral: Tokenizer, reference: MistralTokenizer) -> None:
    tekken = reference.instruct_tokenizer.tokenizer
    assert mistral.eos_token_ids == frozenset({2})
    assert mistral.bos_token_id == 1
    assert mistral.vocab_size == 131072
    assert mistral.is_special(2) and mistral.is_special(999) and not mistral.is_special(1000)
    text = "Héllo wörld 🙂 123"
    assert mistral.encode(text, add_bos=True) == tekken.encode(text, bos=True, eos=False)
    ids = [1, *mistral.encode(text, add_bos=False), 2]
    assert mistral.decode(ids) == text
    assert mistral.decode(ids, skip_special=False) == f"<s>{text}</s>"


@pytest.fixture()
def prompt_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "Mistral-Small-Test"
    write_tekken(directory)
    (directory / "SYSTEM_PROMPT.txt").write_text(
        "You are {name}. Today is {today}; yesterday was {yesterday}."
    )
    return directory


def test_system_prompt_file_is_the_default(prompt_dir: Path, reference: MistralTokenizer) -> None:
    today = datetime.date.today()
    filled = (
        f"You are Mistral-Small-Test. Today is {today}; yesterday was {today - datetime.timedelta(days=1)}."
    )
    user = [{"role": "user", "content": "Hi"}]

    got = load_tokenizer(prompt_dir).encode_chat(user).tokens
    expected = reference.encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content=filled), UserMessage(content="Hi")])
    ).tokens
    assert got == expected

    plain = reference.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Hi")])
    ).tokens
    assert load_tokenizer(prompt_dir, default_system_prompt=False).encode_chat(user).tokens == plain

    own_system = [{"role": "system", "content": "Mine."}, *user]
    expected_own = reference.encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content="Mine."), UserMessage(content="Hi")])
    ).tokens
    assert load_tokenizer(prompt_dir).encode_chat(own_system).tokens == expected_own


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"role": "user"}], "missing field 'content'"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [oa_call("abcabcabc", "get_weather", "{}")]},
                {"role": "user", "content": "y"},
            ],
            "Not the same number of function calls and responses",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAxxxx"}}
                    ],
                }
            ],
            "not a decodable image",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
                }
            ],
            "only data:, http:// and https:// URLs",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "Expected last role User or Tool",
        ),
    ],
)
def test_mistral_bad_input(messages: Any, fragment: str, mistral: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=None) as info:
        mistral.encode_chat(messages)
    assert fragment in str(info.value)


def test_missing_tokenizer_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a model directory"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------- HF / GGUF (SmolLM2 demo)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_gguf: Path) -> Tokenizer:
    return load_tokenizer(demo_gguf)


@pytest.fixture(scope="module")
def hf_reference(demo_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)


@pytest.fixture(scope="module")
def hf_dir_tokenizer(hf_reference: Any, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The same tokenizer as a HF directory (tokenizer.json + config), as transformers saves it."""
    directory = tmp_path_factory.mktemp("hf_tok")
    hf_reference.save_pretrained(directory)
    return load_tokenizer(directory)


HF_CHATS = {
    "user": [{"role": "user", "content": "Hi there!"}],
    "system": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"}],
    "multi_turn": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Ünïcödé 🙂 and 日本語, 12345 apples\n\n  indented"},
    ],
    "special_text_in_content": [{"role": "user", "content": "say <|im_end|> please"}],
}


@pytest.mark.parametrize("name", list(HF_CHATS))
def test_gguf_chat_matches_transformers(
    name: str, demo_tokenizer: Tokenizer, hf_dir_tokenizer: Tokenizer, hf_reference: Any
) -> None:
    messages = HF_CHATS[name]
    expected = hf_reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert demo_tokenizer.encode_chat(messages).tokens == expected
    assert hf_dir_tokenizer.encode_chat(messages).tokens == expected
    assert demo_tokenizer.encode_chat(messages).images == []


TRICKY = [
    "Hello, world!",
    "naïve café — déjà vu; Straße; ÅNGSTRÖM",
    "日本語のテキストと中文字符",
    "emoji 🙂👍🏽 and flags 🇫🇷 and ZWJ 👩‍💻",
    "numbers 3.14159, 2024-06-20, 1,000,000 and 007",
    "whitespace   runs\t\ttabs\n\n\nnewlines  \n  trailing   ",
    "def f(x):\n    return x**2  # square\n\nprint(f(12))",
    "it's they're I'LL we've",
    "self.assertEqual(x) from a PhD on YouTube",
    "<|im_start|>assistant\nspecial tokens inline<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_gguf_encode_matches_transformers(
    text: str, demo_tokenizer: Tokenizer, hf_dir_tokenizer: Tokenizer, hf_reference: Any
) -> None:
    expected = hf_reference.encode(text, add_special_tokens=False)
    assert demo_tokenizer.encode(text, add_bos=False) == expected
    assert hf_dir_tokenizer.encode(text, add_bos=False) == expected
    assert demo_tokenizer.encode(text, add_bos=True) == [hf_reference.bos_token_id, *expected]
    assert demo_tokenizer.decode(expected, skip_special=False) == hf_reference.decode(expected)
    # plain-text prompts (completions) follow the model's own BOS convention, as transformers does
    with_specials = hf_reference.encode(text)
    for tok in (demo_tokenizer, hf_dir_tokenizer):
        assert tok.encode(text, add_bos=tok.adds_bos) == with_specials


def test_gguf_basics(demo_tokenizer: Tokenizer, hf_dir_tokenizer: Tokenizer, hf_reference: Any) -> None:
    for tok in (demo_tokenizer, hf_dir_tokenizer):
        assert tok.eos_token_ids == frozenset({hf_reference.eos_token_id})
        assert tok.bos_token_id == hf_reference.bos_token_id
        assert tok.vocab_size == len(hf_reference)
        assert tok.image_token_id is None
        assert tok.is_special(hf_reference.eos_token_id) and not tok.is_special(100)


@pytest.fixture(scope="module")
def demo_meta(demo_gguf: Path) -> dict[str, Any]:
    return read_metadata(demo_gguf)


def _small_gguf(meta: dict[str, Any], target: Path, pre: str, size: int = 8192) -> None:
    """The demo's first `size` tokens (and the merges among them) under another pre-tokenizer
    name: checks our split table against transformers' for the Llama-family names, with no
    other GGUF to hand. Small, because GGUF array fields are slow to read back."""
    tokens = meta["tokenizer.ggml.tokens"][:size]
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"] if (p := m.split(" ", 1))[0] + p[1] in kept]
    writer = gguf.GGUFWriter(target, "llama")
    for key in (
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
    ):
        writer.add_uint32(f"llama.{key}", meta[f"llama.{key}"])
    writer.add_float32(
        "llama.attention.layer_norm_rms_epsilon", meta["llama.attention.layer_norm_rms_epsilon"]
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(meta["tokenizer.ggml.token_type"][:size])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# One name per distinct split list; the demo itself covers smollm's.
_DISTINCT_PRES = sorted({s: n for n, s in PRE_SPLITS.items() if s != PRE_SPLITS["smollm"]}.values())


@pytest.mark.parametrize("pre", _DISTINCT_PRES)
def test_gguf_pre_tokenizers_match_transformers(pre: str, demo_meta: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / f"{pre}.gguf"
    _small_gguf(demo_meta, path, pre)
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TRICKY:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text


def test_hf_bad_input(demo_tokenizer: Tokenizer, tmp_path: Path) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMG_28)}}]}]
    with pytest.raises(TokenizerError, match="no image support"):
        demo_tokenizer.encode_chat(image)
    with pytest.raises(TokenizerError, match="unknown role 'wizard'"):
        demo_tokenizer.encode_chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(TokenizerError, match="tools must be a list"):
        demo_tokenizer.encode_chat([{"role": "user", "content": "hi"}], {"type": "function"})  # type: ignore[arg-type]
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "bad.gguf")


def test_hf_directory_config_and_template_environment(hf_reference: Any, tmp_path: Path) -> None:
    """Named templates in tokenizer_config.json (tool_use chosen when tools are given), AddedToken
    dicts for special tokens, extra EOS ids from generation_config.json, and the helpers HF
    templates rely on (`tojson` without HTML escaping, `raise_exception`, `strftime_now`)."""
    hf_reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    templates = [
        {
            "name": "default",
            "template": "{{ bos_token }}{{ messages[0]['content'] }} {{ strftime_now('%Y') }}",
        },
        {
            "name": "tool_use",
            "template": "{% if tools|length > 1 %}{{ raise_exception('one tool only') }}{% endif %}"
            "{{ tools | tojson }}{{ messages[0]['content'] }}"
            "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}"
            "{% endfor %}{% endfor %}",
        },
    ]
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": templates}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == frozenset({0, 2})

    user = [{"role": "user", "content": "hi"}]
    year = datetime.datetime.now().year
    assert tok.encode_chat(user).tokens == tok.encode(f"<|im_start|>hi {year}", add_bos=False)
    tools = [{"type": "function", "function": {"name": "f", "description": "a<b & c>d", "parameters": {}}}]
    assert tok.encode_chat(user, tools).tokens == tok.encode(json.dumps(tools) + "hi", add_bos=False)
    call = [oa_call("abcDEF123", "f", '{"city": "Paris"}')]
    with_call = [*user, {"role": "assistant", "content": None, "tool_calls": call}]
    assert tok.decode(tok.encode_chat(with_call, tools).tokens).endswith("hiParis")
    with pytest.raises(TokenizerError, match="one tool only"):
        tok.encode_chat(user, tools * 2)


def test_hf_text_parts_become_one_string(demo_tokenizer: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    plain = [{"role": "user", "content": "one\ntwo"}]
    assert demo_tokenizer.encode_chat(parts).tokens == demo_tokenizer.encode_chat(plain).tokens


# ---------------------------------------------------------------- streaming detokenizer

STREAM_TEXT = "Héllo wörld! 日本語 🙂👍🏽 naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("backend", ["mistral", "demo_tokenizer"])
def test_detokenizer_streams_whole_characters(backend: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(backend)
    ids = tok.encode(STREAM_TEXT, add_bos=False)
    # One character spread over several tokens is what makes this test meaningful.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    eos = next(iter(tok.eos_token_ids))
    ids = [*ids[:5], eos, *ids[5:], eos]  # special tokens mid-stream are skipped
    deltas = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == STREAM_TEXT
    assert sum(1 for d in deltas if d) > len(STREAM_TEXT.split()) // 2  # it streams, not one blob at the end


@pytest.mark.parametrize("backend", ["mistral", "demo_tokenizer"])
def test_detokenizer_flushes_an_unfinished_character(backend: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(backend)
    ids = tok.encode(STREAM_TEXT, add_bos=False)
    # Stop where a character is half done: its remaining bytes never arrive.
    cut = next(ids[:k] for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    deltas = stream(tok, cut)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == tok.decode(cut)
    assert deltas[-1].endswith("\ufffd")


def test_detokenizer_keeps_special_tokens_when_asked(mistral: Tokenizer) -> None:
    ids = [1, *mistral.encode("hi", add_bos=False), 2]
    detok = mistral.detokenizer(skip_special=False)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == mistral.decode(ids, skip_special=False) == "<s>hi</s>"
