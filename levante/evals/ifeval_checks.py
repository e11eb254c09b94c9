"""IFEval's 25 verifiable instructions (Zhou et al. 2023, google/IFEval), one function each, named
by the dataset's instruction ids and taking the dataset's kwargs. Written from the published rules
of google-research's `instruction_following_eval` (the registry lm-evaluation-harness also uses):
where that code has a quirk that moves scores (keyword checks match substrings, a postscript
marker may appear anywhere), the quirk is kept so our numbers compare with everyone else's.

Two stand-ins, both because the reference's NLTK needs a download we cannot make at run time:
sentences are counted by rule (see `count_sentences`) instead of Punkt, and words for the
capital-word count are split by regex instead of `word_tokenize` (hyphenated words count once,
as the reference intends)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import langdetect

langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes a verdict repeatable

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def compare(count: int, relation: str, threshold: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, not {relation!r}")
    return count < threshold if relation == "less than" else count >= threshold


def language_is(text: str, language: str) -> bool:
    """Undetectable text (no letters) counts as followed, as in the reference."""
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:
        return True


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "no"}
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def _abbreviation(word: str) -> bool:
    word = word.lstrip("(\"'“‘").lower()
    return word in _ABBREVIATIONS or re.fullmatch(r"[a-z](?:\.[a-z])*", word) is not None


def count_sentences(text: str) -> int:
    """Sentences end at `.`, `!` or `?` (runs included, closing quotes or brackets allowed) before
    whitespace or the end; a lone `.` after a known abbreviation or an initial (`Dr.`, `J.`,
    `e.g.`) does not end one, and a trailing fragment without end punctuation counts."""
    count, start = 0, 0
    for end in _SENTENCE_END.finditer(text):
        words = text[start : end.start()].split()
        if not words or (end.group() == "." and _abbreviation(words[-1])):
            continue
        count, start = count + 1, end.end()
    return count + (re.search(r"\w", text[start:]) is not None)


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


# ---- the instructions, by the dataset's ids -----------------------------------------------------


def keywords_existence(text: str, *, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), text, re.IGNORECASE) for k in keywords)


def keywords_frequency(text: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return compare(len(re.findall(re.escape(keyword.strip()), text, re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(text: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(text: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return compare(text.lower().count(letter.strip().lower()), let_relation, let_frequency)


def response_language(text: str, *, language: str) -> bool:
    return language_is(text, language)


def number_sentences(text: str, *, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(text), relation, num_sentences)


def number_paragraphs(text: str, *, num_paragraphs: int) -> bool:
    """Paragraphs are split by the markdown divider `***`; an empty one counts only at the ends."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    blank = [i for i, p in enumerate(parts) if not p.strip()]
    if any(0 < i < len(parts) - 1 for i in blank):
        return False
    return len(parts) - len(blank) == num_paragraphs


def number_words(text: str, *, num_words: int, relation: str) -> bool:
    return compare(count_words(text), relation, num_words)


def nth_paragraph_first_word(text: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs are split by blank lines here; the nth must start with `first_word`, compared
    case-insensitively up to the first punctuation mark, after leading quotes."""
    parts = text.split("\n\n")
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def number_placeholders(text: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def postscript(text: str, *, postscript_marker: str) -> bool:
    """The marker anywhere in the text (as the reference matches it); `P.S.` and `P.P.S` also
    match with a space after a dot and in any case."""
    marker = postscript_marker.strip()
    patterns = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}
    return re.search(patterns.get(marker, re.escape(marker.lower())), text.lower()) is not None


def number_bullet_lists(text: str, *, num_bullets: int) -> bool:
    """Markdown bullets: lines starting with `*` (not `**`) or `-`, counted exactly."""
    stars = re.findall(r"^\s*\*[^*].*$", text, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(text: str) -> bool:
    return any(option in text for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(text: str, *, num_highlights: int) -> bool:
    """Spans `*x*` or `**x**` with non-blank contents, at least as many as asked."""
    singles = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= num_highlights


def multiple_sections(text: str, *, section_spliter: str, num_sections: int) -> bool:
    """Sections start with the splitter word and a number (`SECTION 1`), at least as many as asked."""
    marker = re.escape(section_spliter.strip())
    return len(re.split(rf"\s?{marker}\s?\d+\s?", text)) - 1 >= num_sections


def json_format(text: str) -> bool:
    """The whole answer parses as JSON, optionally inside one markdown code fence."""
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def title(text: str) -> bool:
    return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", text))


def two_responses(text: str) -> bool:
    """Exactly two different answers separated by `******` (blank parts allowed only at the ends)."""
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


def repeat_prompt(text: str, *, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(text: str, *, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(text: str, *, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"\w+(?:-\w+)*", text)
    return compare(sum(w.isupper() for w in words), capital_relation, capital_frequency)


def english_capital(text: str) -> bool:
    return text.isupper() and language_is(text, "en")


def english_lowercase(text: str) -> bool:
    return text.islower() and language_is(text, "en")


def no_comma(text: str) -> bool:
    return "," not in text


def quotation(text: str) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def loose_variants(text: str) -> list[str]:
    """The 8 readings loose scoring accepts: the answer as is, without its first line, without
    its last, without both (a preamble or sign-off the model added), each also with every `*`
    removed (markdown emphasis)."""
    lines = text.split("\n")
    trimmed = [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    trimmed = [trimmed[0]] + [t.strip() for t in trimmed[1:]]
    return trimmed + [t.replace("*", "") for t in trimmed]


def follows(instruction: str, kwargs: dict[str, Any], text: str, *, loose: bool) -> bool:
    """Strict: the answer itself follows the instruction. Loose: any of `loose_variants` does.
    A blank answer (or variant) never follows anything."""
    check = INSTRUCTIONS[instruction]
    texts = loose_variants(text) if loose else [text]
    return any(t.strip() and check(t, **kwargs) for t in texts)
