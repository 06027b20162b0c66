"""What one evaluation cell runs: :class:`EvalSpec` (task, level or MMLU category, method, items, seed).

Sweep configs (:mod:`tokext.studies.config`) expand into these; :func:`tokext.evaluation.evaluate.evaluate`
takes one.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from tokext.errors import DataFileError, InputError

MC_TASKS = ("mmlu", "piqa", "siqa")
ORGANISM_TASK = "organism"  # the trained model organism's own arithmetic (its test split)
PERPLEXITY_TASK = "perplexity"  # next-token loss on the shipped natural text, in chunks of `length` tokens
MC_METHODS = ("letter", "continuation", "cot")


@dataclass(frozen=True)
class EvalSpec:
    """What one cell evaluates: a task (and level or MMLU category), a method, items and a seed.

    ``method`` is ``"generate"`` for the reasoning tasks, else ``"letter"``, ``"continuation"``
    or ``"cot"``. ``n=None`` keeps every item; ``seed`` picks the generated problems / the subset
    of a data file, and the few-shot demos.
    """

    task: str
    method: str = "generate"
    level: int | None = None
    cot: bool = False
    category: str | None = None
    subjects: tuple[str, ...] | None = None
    n: int | None = 40
    seed: int = 0
    shots: int = 3
    max_new_tokens: int | None = None
    path: str | None = None
    labels_path: str | None = None
    limit_per_subject: int | None = None
    length: int | None = None  # task 'perplexity': tokens per chunk

    @property
    def level_label(self) -> str:
        """The level (reasoning), the MMLU category, or ``"all"``."""
        return str(self.level) if self.level is not None else (self.category or "all")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``length`` only when set (so the ids of other cells are unchanged)."""
        out = dataclasses.asdict(self)
        if out["length"] is None:
            out.pop("length")
        return out

    def load(self) -> list[Any]:
        """The items: :class:`tokext.evaluation.tasks.Example` or :class:`tokext.evaluation.mc.MCItem` records."""
        if self.task == PERPLEXITY_TASK:
            if self.n is None or self.length is None:
                raise InputError("task 'perplexity' needs n (chunks) and length (tokens per chunk)")
            return list(range(self.n))  # chunk indices: the chunks need the model's tokenizer
        if self.task == ORGANISM_TASK:
            from tokext.models.organism import DEFAULT_TASK, organism_examples

            if self.n is None:
                raise InputError("task 'organism' generates its problems: give n, the number of items")
            return organism_examples(self.n, self.seed, split="test", **DEFAULT_TASK)
        if self.task not in MC_TASKS:
            from tokext.evaluation.tasks import get_task

            if self.n is None:
                raise InputError(f"task {self.task!r} generates its problems: give n, the number of items")
            return get_task(self.task).generate(
                self.n, seed=self.seed, level=self.level if self.level is not None else 1
            )
        from tokext.evaluation import mc

        if self.task == "mmlu":
            items = mc.load_mmlu(
                self.path,
                subjects=self.subjects,
                categories=[self.category] if self.category else None,
                limit_per_subject=self.limit_per_subject,
                seed=self.seed,
            )
        else:
            if self.path is None:
                raise DataFileError(f"task {self.task!r} needs `path` (a {self.task.upper()}-format jsonl file)")
            loader = mc.load_piqa if self.task == "piqa" else mc.load_siqa
            items = loader(self.path, self.labels_path)
        if self.n is not None and self.n < len(items):
            keep = sorted(
                random.Random(f"{self.task}/{self.level_label}/{self.seed}").sample(range(len(items)), self.n)
            )
            items = [items[i] for i in keep]
        return items
