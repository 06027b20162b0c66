"""Answer extraction: each cascade step, negation guards, option-text replacement, the Response: section
taking precedence with disagreements flagged, and free-form answers for the reasoning tasks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokext.errors import InputError
from tokext.evaluation.extract import METHODS, extract_choice, extract_free_answer

CHOICES = ("Wrong, Wrong", "Wrong, Not wrong", "Not wrong, Wrong", "Not wrong, Not wrong")


@pytest.mark.parametrize(
    "text, letter, method",
    [
        ("The answer is C.", "C", "answer_is"),
        ("answer: (B)", "B", "answer_is"),
        ("I would choose option D here.", "D", "answer_is"),
        ("The answer is not A; the answer is B.", "B", "answer_is"),
        ("The answer is not A. B is correct.", "B", "is_correct"),
        ("A is incorrect, but D is right.", "D", "is_correct"),
        ("A is not correct. C is correct.", "C", "is_correct"),
        ("B. Because the scenario is fine.", "B", "leading_letter"),
        ("  (C)", "C", "leading_letter"),
        ("**A**", "A", "leading_letter"),
        ("D", "D", "leading_letter"),
        ("I lean towards B over the rest", "B", "first_capital"),
        ("Both scenarios are Not wrong, Not wrong.", "D", "first_capital"),  # option text -> its letter
        ("Not wrong, Not wrong", "D", "leading_letter"),  # longest option replaced first, not "Not wrong, Wrong"
        ("wrong, not wrong", "B", "leading_letter"),  # case-insensitive option match
        ("Wrong, not wrongg!", "B", "fuzzy"),
        ("", None, "none"),
    ],
)
def test_cascade_steps(text, letter, method):
    got = extract_choice(text, CHOICES)
    assert (got.letter, got.method) == (letter, method), got
    assert got.agrees_with_cascade and got.cascade_letter == letter
    assert got.method in METHODS


def test_lowercase_letters_and_words_are_not_choices():
    # "a" (article) and capitals outside the choice letters are ignored; "E" is not a choice here
    got = extract_choice("a good one is E, or maybe C", ["x", "y", "z", "w"])
    assert got.letter == "C"
    assert extract_choice("Definitely Bogus", ["x", "y"]).method == "fuzzy"


def test_response_section_wins_and_disagreement_is_flagged():
    text = "Analysis: A could be argued, B is weak.\nResponse: C"
    got = extract_choice(text, ["p", "q", "r", "s"])
    assert got.letter == "C" and got.method == "response_section"
    assert got.cascade_letter == "A" and not got.agrees_with_cascade

    agree = extract_choice("Analysis: option C is plausible.\nResponse: C", ["p", "q", "r", "s"])
    assert agree.letter == "C" and agree.agrees_with_cascade


def test_last_response_section_and_paragraph():
    text = "Response: A was my first thought.\nAnalysis: no.\nResponse:\n  B\n\nQuestion: next... Answer is D"
    assert extract_choice(text, ["p", "q", "r", "s"]).letter == "B"
    # an empty Response: section falls back to the cascade on the whole text
    got = extract_choice("I think the answer is D.\nResponse:", ["p", "q", "r", "s"])
    assert (got.letter, got.method, got.agrees_with_cascade) == ("D", "answer_is", True)


def test_response_with_option_text():
    got = extract_choice("Analysis: A is harsh.\nResponse: Not wrong, Wrong", CHOICES)
    assert (got.letter, got.method) == ("C", "response_section")


def test_two_and_three_choices():
    assert extract_choice("The answer is B", ["twist", "bite"]).letter == "B"
    assert extract_choice("The answer is C", ["twist", "bite"]).letter != "C"  # C is not a choice
    assert extract_choice("Response: C", ["x", "y", "z"]).letter == "C"


def test_longest_option_replaced_first():
    choices = ["Paris", "Paris, France", "Lyon", "Nice"]
    assert extract_choice("Paris, France", choices).letter == "B"
    assert extract_choice("It is Paris, France.", choices).letter == "B"
    assert extract_choice("It is Paris.", choices).letter == "A"


def test_numeric_options_not_matched_inside_numbers():
    choices = ["4", "14", "40", "44"]
    assert extract_choice("The total is 14 apples", choices).letter == "B"
    assert extract_choice("so 44", choices).letter == "D"


def test_custom_letters_and_bad_arguments():
    assert extract_choice("The answer is Y", ["a", "b"], letters="XY").letter == "Y"
    with pytest.raises(InputError, match="letters"):
        extract_choice("A", ["a", "b"], letters="ABC")
    with pytest.raises(InputError, match="letters"):
        extract_choice("A", ["a", "b"], letters="AA")
    with pytest.raises(InputError, match="string"):
        extract_choice(None, ["a", "b"])


@settings(max_examples=100, deadline=None)
@given(
    label=st.integers(0, 3),
    template=st.sampled_from(
        [
            "{L}",
            "{L}.",
            "The answer is {L}.",
            "Response: {L}",
            "({L}) {text}",
            "Analysis: looks fine.\nResponse: {L}",
            "I choose {L}",
        ]
    ),
)
def test_well_formed_outputs_are_read_exactly(label, template):
    letter = "ABCD"[label]
    text = template.format(L=letter, text=CHOICES[label])
    assert extract_choice(text, CHOICES).letter == letter


# ---- free-form answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, numeric, want",
    [
        ("7 + 5 = 12\n12 * 2 = 24\nResponse: 24", None, "24"),
        (" 42\n\nStart with 3. Add 4.\nAnswer: 7", None, "42"),  # invented demo after a blank line ignored
        ("x = 1\nResponse: 5\n\nQ?\nAnalysis: 9\nResponse: 9", None, "5"),  # first Response wins
        ("so 7\nQ?\nAnalysis: foo\nResponse: 9", None, "7"),  # after "Analysis:" comes an invented demo
        ("The sum.\nAnswer: 17\nmore", None, "17"),
        ("7 + 5 = 12\n12 * 2 = 24", None, "24"),  # no marker: last number of the first paragraph
        ("7 + 5 = 12\n12 * 2 = 24", False, "7 + 5 = 12"),
        (" Bob\nmore", False, "Bob"),
        (" Bob", None, "Bob"),
        ("no digits here", True, None),
        ("", None, None),
        ("Response: -3", None, "-3"),
    ],
)
def test_extract_free_answer(text, numeric, want):
    assert extract_free_answer(text, numeric=numeric) == want
