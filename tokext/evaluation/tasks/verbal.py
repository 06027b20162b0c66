"""Non-numeric ordering ("Tom is taller than Ann. Ann is taller than Bob. Who is the shortest?").

Level ``L`` has ``L + 2`` people (3..6) and one fact per neighbouring pair of the hidden order, so the
order is fully determined. From level 2 the facts are shuffled; from level 3 each fact is phrased
either way round ("Ann is shorter than Tom"). The question asks for one end of the order; the answer
is a name. The CoT restates the facts in order, then the whole order.
"""

from __future__ import annotations

import random
from typing import Any

from tokext.evaluation.tasks._vocab import NAMES
from tokext.evaluation.tasks.base import Task

# (more, less, most, least)
SCALES: tuple[tuple[str, str, str, str], ...] = (
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)


def n_people(level: int) -> int:
    """Number of people to order at ``level``."""
    return level + 2


class Verbal(Task):
    """Seeded ordering problems with a one-word (name) answer (see the module docstring)."""

    name = "verbal"
    description = "order people from pairwise comparisons; answer a name ('Who is the shortest?')"

    def make(self, rng: random.Random, level: int) -> tuple[str, str, str, dict[str, Any]]:
        """One problem at ``level``: ``(question, answer, cot_solution, meta)``."""
        more, less, most, least = rng.choice(SCALES)
        order = rng.sample(NAMES, n_people(level))  # order[0] is the most <more>
        pairs = list(zip(order, order[1:]))
        if level >= 2:
            rng.shuffle(pairs)
        facts = []
        for a, b in pairs:
            if level >= 3 and rng.random() < 0.5:
                facts.append(f"{b} is {less} than {a}.")
            else:
                facts.append(f"{a} is {more} than {b}.")
        ask_most = rng.random() < 0.5
        superlative = most if ask_most else least
        question = " ".join(facts) + f" Who is the {superlative}?"
        answer = order[0] if ask_most else order[-1]
        steps = [f"{a} is {more} than {b}." for a, b in zip(order, order[1:])]
        steps.append(f"From {most} to {least}: {', '.join(order)}.")
        steps.append(f"The {superlative} is {answer}.")
        meta = {"order": order, "scale": more, "asks": superlative}
        return question, answer, "\n".join(steps), meta
