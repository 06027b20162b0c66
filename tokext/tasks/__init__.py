"""Seeded reasoning tasks (arithmetic, variable tracking, key-value lookup, ordering) and their registry.

>>> from tokext.tasks import get_task, prompt
>>> ex = get_task("arithmetic").generate(2, seed=0, level=1)[0]
>>> ex.cot_solution.splitlines()[-1] == f"Response: {ex.answer}"
True
"""

from __future__ import annotations

import difflib

from tokext.errors import InputError
from tokext.tasks.arithmetic import Arithmetic
from tokext.tasks.base import COT_INSTRUCTION, LEVELS, Example, Task, prompt, prompt_block, target
from tokext.tasks.lookup import Lookup
from tokext.tasks.scoring import score_exact
from tokext.tasks.variables import Variables
from tokext.tasks.verbal import Verbal

TASKS: dict[str, Task] = {
    task.name: task
    for task in (Arithmetic("chain"), Arithmetic("expression"), Variables(), Lookup(), Verbal())
}


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered task called ``name``; an :class:`InputError` with suggestions otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(TASKS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown task {name!r}.{hint} Available: {', '.join(list_tasks())}") from None


__all__ = [
    "COT_INSTRUCTION",
    "LEVELS",
    "TASKS",
    "Example",
    "Task",
    "get_task",
    "list_tasks",
    "prompt",
    "prompt_block",
    "score_exact",
    "target",
]
