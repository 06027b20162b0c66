"""Seeded reasoning tasks (arithmetic, variable tracking, key-value lookup, ordering) and their registry.

>>> from tokext.evaluation.tasks import get_task, prompt
>>> ex = get_task("arithmetic").generate(2, seed=0, level=1)[0]
>>> ex.cot_solution.splitlines()[-1] == f"Response: {ex.answer}"
True
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from tokext.errors import InputError
from tokext.evaluation.tasks.arithmetic import Arithmetic
from tokext.evaluation.tasks.base import COT_INSTRUCTION, LEVELS, Example, Task, prompt_block, target
from tokext.evaluation.tasks.lookup import Lookup
from tokext.evaluation.tasks.scoring import score_exact
from tokext.evaluation.tasks.variables import Variables
from tokext.evaluation.tasks.verbal import Verbal

TASKS: dict[str, Task] = {
    task.name: task for task in (Arithmetic("chain"), Arithmetic("expression"), Variables(), Lookup(), Verbal())
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


def prompt(
    example: Example,
    cot: bool,
    *,
    shots: int = 3,
    demos: Sequence[Example] | None = None,
    demo_seed: int = 0,
) -> str:
    r"""The full prompt: ``shots`` worked demos (same task and level), then ``example``'s block.

    ``demos`` overrides the generated demos (``shots`` is then ignored). Direct demos show
    ``"Answer: X"``; CoT demos show the worked chain ending in ``"Response: X"``.

    >>> from tokext.evaluation.tasks import get_task
    >>> ex = get_task("variables").generate(1, seed=0, level=1)[0]
    >>> prompt(ex, cot=False, shots=0).endswith("\nAnswer:")
    True
    """
    if demos is None:
        if shots < 0:
            raise InputError(f"shots must be >= 0, got {shots}")
        demos = get_task(example.task).demos(shots, example.level, seed=demo_seed, exclude=example.question)
    blocks = [prompt_block(d, cot) + target(d, cot) for d in demos]
    blocks.append(prompt_block(example, cot))
    return "\n\n".join(blocks)


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
