"""IFEval scoring against hand-worked answers: each of the 25 instructions followed and broken,
the loose readings, the four summary numbers, and the loader's errors on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from levante.errors import LevanteError
from levante.evals.ifeval import IFEval
from levante.evals.ifeval_checks import INSTRUCTIONS, count_sentences, follows
from levante.evals.suite import DataMissing, Item, Options

CASES = [  # instruction, kwargs, an answer that follows it, one that does not
    ("keywords:existence", {"keywords": ["beam", "fog"]}, "The Beam cut the FOG.", "The beam cut the mist."),
    (
        "keywords:frequency",
        {"keyword": "light", "frequency": 2, "relation": "at least"},
        "Light, more lighthouse light.",
        "One light only.",
    ),
    ("keywords:forbidden_words", {"forbidden_words": ["chess"]}, "Chessboards are wood.", "I play CHESS."),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        "A zebra.",
        "Zigzag.",
    ),
    (
        "language:response_language",
        {"language": "fr"},
        "Bonjour, je voudrais un café au lait et deux croissants, s'il vous plaît.",
        "Hello, I would like a coffee with milk and two croissants, please.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "at least"},
        "Dr. Smith came at 9.30 today. He sat down! Was it late",
        "Dr. Smith came. He sat down.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "One.\n***\nTwo.",
        "One.\n***\n\n***\nTwo.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Four words right here.",
        "These are six words right here.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Together"},
        'We row.\n\n"Together, we win."',
        "We row.\n\nApart we lose.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], on [date].",
        "Dear [name].",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Bye.\n\np. s. Call me.",
        "Bye. PS call me.",
    ),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n- c", "* a\n* b\n**bold** c"),
    ("detectable_format:constrained_response", {}, "Sure. My answer is no.", "No."),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* and **two**",
        "*one* and ** **",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 3},
        "SECTION 1\na\nSECTION 2\nb\nSECTION 3\nc",
        "SECTION 1\na\nSECTION 2\nb",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<Joy>>\nA poem.", "<< >>\nA poem."),
    ("combination:two_responses", {}, "Alpha\n******\nBeta", "Alpha\n******\nAlpha"),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "What is tea?"},
        "what is tea? A drink.",
        "Tea: what is tea?",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        'Done. Any other questions?"',
        "Any other questions? Bye.",
    ),
    ("startend:quotation", {}, '  "All good."  ', '"All good.'),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": "less than"},
        "NASA and WELL-KNOWN ones fly.",
        "I SAW A cat.",
    ),
    (
        "change_case:english_capital",
        {},
        "THIS IS A SHORT ANSWER WRITTEN IN PLAIN ENGLISH.",
        "This is a short answer written in plain English.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "this is a short answer written in plain english.",
        "This is a short answer written in plain English.",
    ),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, one."),
]


def test_cases_cover_every_instruction() -> None:
    assert len(INSTRUCTIONS) == 25
    assert {case[0] for case in CASES} == set(INSTRUCTIONS)


@pytest.mark.parametrize(("instruction", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_instruction(instruction: str, kwargs: dict, good: str, bad: str) -> None:
    assert follows(instruction, kwargs, good, loose=False)
    assert not follows(instruction, kwargs, bad, loose=False)
    assert not follows(instruction, kwargs, bad, loose=True)


@pytest.mark.parametrize(
    ("instruction", "kwargs", "text"),
    [
        ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),  # preamble line
        ("startend:quotation", {}, '"Fine, thanks."\nHope this helps!'),  # sign-off line
        ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Thanks.\n**Any other questions?**"),
        ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas in the answer."),
        ("detectable_format:title", {}, "Intro.\n<<Title>>"),  # followed as is: loose agrees
    ],
)
def test_loose_reads_past_preamble_sign_off_and_markdown(instruction: str, kwargs: dict, text: str) -> None:
    assert follows(instruction, kwargs, text, loose=True)
    assert follows(instruction, kwargs, text, loose=False) == (instruction == "detectable_format:title")


def test_blank_answer_follows_nothing() -> None:
    for loose in (False, True):
        assert not follows("punctuation:no_comma", {}, "  \n ", loose=loose)
        assert not follows("keywords:forbidden_words", {"forbidden_words": ["x"]}, "", loose=loose)


def test_sentence_count() -> None:
    assert count_sentences("") == 0
    assert count_sentences("One. Two! Three?! Four") == 4
    assert count_sentences('He said "stop." Then e.g. J. R. R. Tolkien left. Pi is 3.14.') == 3
    assert count_sentences("Wait... what?") == 2
    assert count_sentences("Mr. and Mrs. Dursley of No. 4 were proud.") == 1


def test_undetectable_language_counts_as_followed() -> None:
    """As in the reference: langdetect finds no features in digits alone."""
    assert follows("language:response_language", {"language": "de"}, "12345", loose=False)


def test_sample_covers_every_instruction_and_scores_four_numbers() -> None:
    suite = IFEval(Options())
    items = suite.load(None, sample=True)
    assert 0 < len(items) <= 10
    assert {i for item in items for i in item.data["instruction_id_list"]} == set(INSTRUCTIONS)
    assert all(None not in kwargs.values() for item in items for kwargs in item.data["kwargs"])

    ids = ["punctuation:no_comma", "detectable_format:title"]
    comma = Item("a", {"prompt": "p", "instruction_id_list": ids, "kwargs": [{}, {}]})
    records = [
        suite.score(comma, "Sure, here:\n<<Title>> text"),  # strict: title only; loose: both
        suite.score(comma, "<<Title>> and no comma"),  # both, both
        suite.score(comma, "", error="400: prompt too long"),  # a refusal: nothing followed
    ]
    assert records[0].info == {"strict": [False, True], "loose": [True, True]}
    assert records[2].info["error"] == "400: prompt too long"
    assert suite.summarize(records) == pytest.approx(
        {
            "prompt_level_strict_acc": 100 / 3,
            "inst_level_strict_acc": 100 * 3 / 6,
            "prompt_level_loose_acc": 200 / 3,
            "inst_level_loose_acc": 100 * 4 / 6,
        }
    )


def write(tmp_path: Path, *entries: dict) -> Path:
    (tmp_path / "ifeval").mkdir(exist_ok=True)
    (tmp_path / "ifeval" / "ifeval_input_data.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in entries)
    )
    return tmp_path


def entry(key: int, instruction: str, kwargs: dict) -> dict:
    return {"key": key, "prompt": "Say hi.", "instruction_id_list": [instruction], "kwargs": [kwargs]}


def test_loads_the_dataset_format_with_nulls(tmp_path: Path) -> None:
    """Hugging Face's copy gives every instruction every kwarg, unused ones null."""
    kwargs = {"num_words": 50, "relation": "less than", "keywords": None, "num_bullets": None}
    (item,) = IFEval(Options()).load(
        write(tmp_path, entry(1001, "length_constraints:number_words", kwargs)), False
    )
    assert item.id == "1001"
    assert item.data["kwargs"] == [{"num_words": 50, "relation": "less than"}]


@pytest.mark.parametrize(
    ("instruction", "kwargs", "message"),
    [
        ("keywords:telepathy", {}, "unknown instruction 'keywords:telepathy'"),
        (
            "length_constraints:number_words",
            {"num_words": 5, "relation": "more than"},
            "relation must be one of",
        ),
        ("length_constraints:number_words", {"relation": "at least"}, "num_words"),
        ("punctuation:no_comma", {"comma": 1}, "comma"),
    ],
)
def test_bad_kwargs_fail_the_load_naming_the_item(
    tmp_path: Path, instruction: str, kwargs: dict, message: str
) -> None:
    with pytest.raises(LevanteError, match="key 7") as e:
        IFEval(Options()).load(write(tmp_path, entry(7, instruction, kwargs)), False)
    assert message in str(e.value)


def test_missing_data_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataMissing, match=r"ifeval_input_data\.jsonl"):
        IFEval(Options()).load(tmp_path, False)
    with pytest.raises(DataMissing, match="--data-dir"):
        IFEval(Options()).load(None, False)
    (tmp_path / "ifeval").mkdir()
    (tmp_path / "ifeval" / "ifeval_input_data.jsonl").write_text('{"key": 1}\nnot json\n')
    with pytest.raises(LevanteError, match=r"ifeval_input_data.jsonl:2: not JSON"):
        IFEval(Options()).load(tmp_path, False)
