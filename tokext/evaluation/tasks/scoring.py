"""Exact-match scoring of free-form answers to the generated tasks.

Both sides are normalised the same way: surrounding whitespace, quotes, brackets and markdown
asterisks are removed, as is trailing punctuation ("42." -> "42"); integers are compared as integers
("+7", "007", "1,000" and "7.0" all work), anything else case-insensitively ("bob" == "Bob").
"""

from __future__ import annotations

import re

_STRIP = " \t\r\n\"'`*()[]{}"
_TRAILING = ".,;:!?"
_INT = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+(?:\.0+)?")


def normalise(text: str) -> str:
    """Strip wrapping quotes/brackets/asterisks and trailing punctuation; collapse inner whitespace."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip(_STRIP).rstrip(_TRAILING)
    return " ".join(text.split())


def as_int(text: str) -> int | None:
    """The integer ``text`` spells (after :func:`normalise`), or None."""
    text = normalise(text)
    if not _INT.fullmatch(text):
        return None
    return int(text.replace(",", "").split(".")[0])


def score_exact(prediction: str | None, answer: str) -> bool:
    """True when ``prediction`` states exactly ``answer`` (see the module docstring for normalisation).

    >>> score_exact(" 42.", "42"), score_exact("bob", "Bob"), score_exact("41", "42")
    (True, True, False)
    """
    if prediction is None:
        return False
    want = as_int(answer)
    if want is not None:
        return as_int(prediction) == want
    return normalise(prediction).casefold() == normalise(answer).casefold()
