r"""Example records, the seeded task base class, and the two prompt forms (direct and chain-of-thought).

Every task yields :class:`Example` records with a worked ``cot_solution`` ending in
``"Response: <answer>"``, so one record serves evaluation, few-shot demos and fine-tuning.

Prompt forms (one example; few-shot demos are the same blocks with their targets filled in, separated
by a blank line):

* direct: ``"<question>\nAnswer:"``, target ``" <answer>"``;
* CoT: ``"<question>\n<COT_INSTRUCTION>\nAnalysis:"``, target ``" <cot_solution>"``.

Small models (SmolLM2-135M) rarely produce either format zero-shot, hence ``shots=3`` by default.
Demos come from a seed stream separate from the evaluation stream, so they never depend on, and
(by construction of :meth:`Task.demos`) are never identical to, the evaluated question.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tokext.errors import InputError

LEVELS: tuple[int, ...] = (1, 2, 3, 4)
COT_INSTRUCTION = (
    "Work it out step by step, writing each intermediate result on its own line, "
    'then give the final answer on a last line that starts with "Response:".'
)
_MAX_TRIES_PER_ITEM = 50


@dataclass(frozen=True)
class Example:
    """One generated reasoning problem.

    ``id`` is unique within a (task, seed, level) draw; ``meta`` holds task-specific facts (the
    expression, the chain of intermediate values, ...) useful for analysis; ``cot_solution`` is the
    worked chain of intermediate results, ending in ``"Response: <answer>"``.
    """

    task: str
    id: str
    question: str
    answer: str
    level: int
    meta: dict[str, Any] = field(hash=False)
    cot_solution: str


def prompt_block(example: Example, cot: bool) -> str:
    """The prompt for ``example`` alone, without demos: what the model must continue."""
    if cot:
        return f"{example.question}\n{COT_INSTRUCTION}\nAnalysis:"
    return f"{example.question}\nAnswer:"


def target(example: Example, cot: bool) -> str:
    """The ideal continuation of :func:`prompt_block` (leading space included): for demos and fine-tuning."""
    return f" {example.cot_solution}" if cot else f" {example.answer}"


class Task(ABC):
    """A seeded generator of :class:`Example` records at difficulty levels 1..4.

    Subclasses set ``name`` and implement :meth:`make`, drawing every random choice from the ``rng``
    they are given, so that ``generate(n, seed, level)`` is a pure function of its arguments.
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def make(self, rng: random.Random, level: int) -> tuple[str, str, str, dict[str, Any]]:
        """One problem at ``level``: ``(question, answer, cot_solution, meta)``."""

    def generate(self, n: int, seed: int, level: int = 1) -> list[Example]:
        """``n`` distinct problems at ``level``, the same for the same ``(n, seed, level)``.

        A larger ``n`` extends a smaller draw: ``generate(5, s, l)[:3] == generate(3, s, l)``.
        """
        return self._draw(n, seed, level, stream="eval")

    def demos(self, k: int, level: int, *, seed: int = 0, exclude: str | None = None) -> list[Example]:
        """``k`` worked demos from the demo seed stream (independent of :meth:`generate`'s stream).

        ``exclude``: a question text that must not appear among the demos (the evaluated one).
        """
        if k < 0:
            raise InputError(f"the number of demos must be >= 0, got {k}")
        drawn = self._draw(k + 1, seed, level, stream="demo")
        return [d for d in drawn if d.question != exclude][:k]

    def _draw(self, n: int, seed: int, level: int, stream: str) -> list[Example]:
        if not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a non-negative integer, got {n!r}")
        if level not in LEVELS:
            raise InputError(f"level must be one of {LEVELS} for task {self.name!r}, got {level!r}")
        rng = random.Random(f"{self.name}/{stream}/{seed}/{level}")
        seen: set[str] = set()
        out: list[Example] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > _MAX_TRIES_PER_ITEM * (n + 1):
                raise InputError(
                    f"task {self.name!r} level {level} could only produce {len(out)} distinct problems, "
                    f"{n} were asked for"
                )
            question, answer, solution, meta = self.make(rng, level)
            if question in seen:
                continue
            seen.add(question)
            out.append(
                Example(
                    task=self.name,
                    id=f"{self.name}/L{level}/{stream}{seed}/{len(out)}",
                    question=question,
                    answer=answer,
                    level=level,
                    meta=meta,
                    cot_solution=f"{solution}\nResponse: {answer}",
                )
            )
        return out
