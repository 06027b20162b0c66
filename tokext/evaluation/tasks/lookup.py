"""In-context key-value lookup ("Key-value pairs: apple: 7, river: 3, stone: 5. What is the value of river?").

Levels 1..3 are one-hop lookups among 3, 6 and 10 pairs. Level 4 is a two-hop lookup among 8 pairs:
the first key's value is another key, whose value is the number asked for ("Look up apple, then look
up the value you found. What number do you get?"). Keys are distinct common nouns, values 1..99.
"""

from __future__ import annotations

import random
from typing import Any

from tokext.evaluation.tasks._vocab import NOUNS
from tokext.evaluation.tasks.base import Task

_PAIRS_AND_HOPS: dict[int, tuple[int, int]] = {1: (3, 1), 2: (6, 1), 3: (10, 1), 4: (8, 2)}


def pairs_and_hops(level: int) -> tuple[int, int]:
    """``(number of pairs, number of hops)`` at ``level``."""
    return _PAIRS_AND_HOPS[level]


class Lookup(Task):
    """Seeded key-value lookup problems (see the module docstring)."""

    name = "lookup"
    description = "find a key's value in a list of pairs; two hops at level 4"

    def make(self, rng: random.Random, level: int) -> tuple[str, str, str, dict[str, Any]]:
        """One problem at ``level``: ``(question, answer, cot_solution, meta)``."""
        n_pairs, hops = pairs_and_hops(level)
        keys = rng.sample(NOUNS, n_pairs)
        table: dict[str, str] = {k: str(rng.randint(1, 99)) for k in keys}
        path = rng.sample(keys, hops)  # path[0] -> path[1] -> ... -> number
        for here, there in zip(path, path[1:]):
            table[here] = there
        pairs = ", ".join(f"{k}: {v}" for k, v in table.items())
        if hops == 1:
            question = f"Key-value pairs: {pairs}. What is the value of {path[0]}?"
        else:
            question = (
                f"Key-value pairs: {pairs}. Look up {path[0]}, then look up the value you found. "
                "What number do you get?"
            )
        steps = [f"{k}: {table[k]}" for k in path]
        answer = table[path[-1]]
        meta = {"pairs": dict(table), "path": path, "hops": hops}
        return question, answer, "\n".join(steps), meta
