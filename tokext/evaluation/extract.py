"""Read the chosen letter (multiple choice) or the final answer (reasoning tasks) out of generated text.

:func:`extract_choice` first parses the section after the last ``"Response:"`` (the format our CoT
prompts ask for), then falls back to the cascade of arXiv 2403.14932 §4 over the whole text:

1. option texts quoted verbatim are replaced by their letters, longest option first;
2. ``answer_is``: "the answer is X" / "answer: X" / "choose X", unless negated ("is not X");
3. ``is_correct``: "X is correct" / "X is right", unless negated;
4. ``leading_letter``: the text starts with a letter ("B.", "(B)", "**B**");
5. ``first_capital``: the first standalone capital letter among the choices' letters;
6. ``fuzzy``: the option text most similar to the whole output (difflib).

The paper ran the cascade on the whole output, so on CoT text it can pick a letter from the analysis;
the cascade's answer is therefore always computed too, and a disagreement with the ``Response:``
section is flagged (``agrees_with_cascade=False``).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokext.errors import InputError

METHODS = ("response_section", "answer_is", "is_correct", "leading_letter", "first_capital", "fuzzy", "none")
_NEGATION = re.compile(r"\b(?:not|never|cannot)\b|n't\b", re.IGNORECASE)
_RESPONSE = re.compile(r"response\s*:", re.IGNORECASE)
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_ANALYSIS = re.compile(r"analysis\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Extraction:
    """The extracted letter (None when nothing could be read) and how it was found.

    ``cascade_letter`` / ``cascade_method``: what the paper's full-text cascade alone gives;
    ``agrees_with_cascade``: whether it equals ``letter`` (always True when the cascade was used).
    """

    letter: str | None
    method: str
    agrees_with_cascade: bool
    cascade_letter: str | None
    cascade_method: str


def extract_choice(text: str, choices: Sequence[str], letters: str | None = None) -> Extraction:
    r"""The letter that ``text`` (a model's generated continuation) chooses among ``choices``.

    >>> extract_choice("A looks wrong; C is plausible.\nResponse: C", ["x", "y", "z"])  # doctest: +NORMALIZE_WHITESPACE
    Extraction(letter='C', method='response_section', agrees_with_cascade=False,
               cascade_letter='A', cascade_method='first_capital')
    """
    if letters is None:
        letters = "ABCDEFGH"[: len(choices)]
    if len(letters) != len(choices) or len(set(letters)) != len(letters) or not letters.isupper():
        raise InputError(f"letters must be {len(choices)} distinct capitals, one per choice; got {letters!r}")
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    cascade_letter, cascade_method = _cascade(text, choices, letters, fuzzy=True)
    section = _response_section(text)
    if section is not None:
        letter, _ = _cascade(section, choices, letters, fuzzy=False)
        if letter is not None:
            agrees = letter == cascade_letter
            return Extraction(letter, "response_section", agrees, cascade_letter, cascade_method)
    return Extraction(cascade_letter, cascade_method, True, cascade_letter, cascade_method)


def extract_free_answer(text: str, numeric: bool | None = None) -> str | None:
    r"""The final answer in a generated continuation, for the reasoning tasks (score with ``score_exact``).

    Pass only the continuation, not the prompt. In order: the first line after the first
    ``"Response:"``; else after an ``"Answer:"`` in the first paragraph; else, in the first paragraph,
    the last number (``numeric`` True or None) or the first line (``numeric`` False, or no number).
    Few-shot models often go on to invent further demos, so nothing after an ``"Analysis:"`` (the start
    of an invented CoT demo) or, for ``"Answer:"``, after the first blank line is read.

    >>> extract_free_answer("3 + 4 = 7\n7 * 2 = 14\nResponse: 14\n\nStart with 2.")
    '14'
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    own = _ANALYSIS.split(text, maxsplit=1)[0]
    paragraph = own.strip().split("\n\n")[0]
    for marker, where in ((_RESPONSE, own), (_ANSWER, paragraph)):
        m = marker.search(where)
        if m and (line := _first_line(where[m.end() :])):
            return line
    if numeric is not False:
        numbers = _NUMBER.findall(paragraph)
        if numbers:
            return numbers[-1].rstrip(",")
        if numeric:
            return None
    return _first_line(paragraph)


def _first_line(text: str) -> str | None:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return None


def _response_section(text: str) -> str | None:
    """The first paragraph after the last "Response:", or None when there is none."""
    matches = list(_RESPONSE.finditer(text))
    if not matches:
        return None
    return text[matches[-1].end() :].strip().split("\n\n")[0]


def _replace_options(text: str, choices: Sequence[str], letters: str) -> str:
    """Each verbatim occurrence of an option text becomes its letter (longest option first)."""
    spans = sorted(
        ((c.strip().rstrip("."), letter) for c, letter in zip(choices, letters)),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    spans = [(s, letter) for s, letter in spans if s and s not in letters]
    if not spans:
        return text
    pattern = "|".join(f"(?P<o{i}>{_bounded(s)})" for i, (s, _) in enumerate(spans))

    def letter_of(match: re.Match[str]) -> str:
        matched = next(name for name, value in match.groupdict().items() if value is not None)  # one group per option
        return spans[int(matched[1:])][1]

    return re.sub(pattern, letter_of, text, flags=re.IGNORECASE)


def _bounded(option: str) -> str:
    """A regex for ``option`` that does not match inside a longer word or number."""
    head = r"(?<!\w)" if option[:1].isalnum() else ""
    tail = r"(?!\w)" if option[-1:].isalnum() else ""
    return f"{head}{re.escape(option)}{tail}"


@functools.lru_cache(maxsize=32)
def _patterns(letters: str) -> list[tuple[str, re.Pattern[str]]]:
    """The cascade's regexes, first match wins; letters are matched case-sensitively, keywords not."""
    L = re.escape(letters)
    letter = rf"(?<![A-Za-z])(?P<x>[{L}])(?![A-Za-z])"
    return [
        (
            "answer_is",
            re.compile(
                rf"(?:\b(?i:answer|choice|option)s?\b(?P<gap>[^{L}\n]{{0,12}}?(?:\b(?i:is|be)\b|:))"
                rf"|\b(?i:choose|select|pick)\b)(?P<gap2>[^{L}\n]{{0,20}}?){letter}"
            ),
        ),
        ("is_correct", re.compile(rf"{letter}(?P<gap>[^{L}\n]{{0,12}}?)\b(?i:correct|right)\b")),
        ("leading_letter", re.compile(rf"^[\s(\[*\"']*(?P<x>[{L}])(?:[.,:)\]*\"']|[ \t]*(?:\n|$))")),
        ("first_capital", re.compile(rf"(?<![A-Za-z])(?P<x>[{L}])(?![A-Za-z=])")),
    ]


def _cascade(text: str, choices: Sequence[str], letters: str, fuzzy: bool) -> tuple[str | None, str]:
    gen = _replace_options(text, choices, letters)
    for method, pattern in _patterns(letters):
        pos = 0
        while (m := pattern.search(gen, pos)) is not None:
            gaps = "".join(m.group(g) or "" for g in ("gap", "gap2") if g in pattern.groupindex)
            if not _NEGATION.search(gaps):
                return m.group("x"), method
            pos = m.start() + 1
    if fuzzy and text.strip():
        scores = [difflib.SequenceMatcher(None, text.casefold(), c.casefold()).ratio() for c in choices]
        if max(scores) > 0:
            return letters[scores.index(max(scores))], "fuzzy"
    return None, "none"
