"""Variable tracking ("a = 3; b = a + 2; c = b - 1. What is c?").

Level ``L`` has a dependency chain of ``L + 1`` assignments (2..5), plus ``L - 2`` distractor
assignments (levels 3 and 4) that read a chain variable but are never asked about. Values stay
non-negative. The CoT substitutes and evaluates each chain assignment in turn.
"""

from __future__ import annotations

import random
from typing import Any

from tokext.evaluation.tasks._vocab import VARIABLES
from tokext.evaluation.tasks.base import Task


def chain_length(level: int) -> int:
    """Number of assignments on the path to the queried variable."""
    return level + 1


def n_distractors(level: int) -> int:
    """Number of assignments that are not on the path to the queried variable."""
    return max(0, level - 2)


class Variables(Task):
    """Seeded variable-tracking problems (see the module docstring)."""

    name = "variables"
    description = "track a chain of assignments ('x = 3; y = x + 2. What is y?')"

    def make(self, rng: random.Random, level: int) -> tuple[str, str, str, dict[str, Any]]:
        """One problem at ``level``: ``(question, answer, cot_solution, meta)``."""
        n_chain, n_extra = chain_length(level), n_distractors(level)
        names = rng.sample(VARIABLES, n_chain + n_extra)
        chain, extra = names[:n_chain], names[n_chain:]
        value = rng.randint(1, 9)
        values = {chain[0]: value}
        statements = [f"{chain[0]} = {value}"]
        steps = [f"{chain[0]} = {value}"]
        for prev, var in zip(chain, chain[1:]):
            old = values[prev]
            op, k, new = _step(rng, old)
            values[var] = new
            statements.append(f"{var} = {prev} {op} {k}")
            steps.append(f"{var} = {prev} {op} {k} = {old} {op} {k} = {new}")
        for var in extra:
            src_pos = rng.randrange(len(chain))
            op, k, _ = _step(rng, values[chain[src_pos]])
            # insert after the source's own assignment, anywhere before the end
            at = rng.randint(_position(statements, chain[src_pos]) + 1, len(statements))
            statements.insert(at, f"{var} = {chain[src_pos]} {op} {k}")
        question = "; ".join(statements) + f". What is {chain[-1]}?"
        meta = {"chain": chain, "distractors": extra, "values": [values[v] for v in chain]}
        return question, str(values[chain[-1]]), "\n".join(steps), meta


def _step(rng: random.Random, old: int) -> tuple[str, int, int]:
    """A random ``+ k`` or ``- k`` (1 <= k <= 9) that keeps the value non-negative."""
    op = rng.choice("+-") if old >= 1 else "+"
    k = rng.randint(1, 9) if op == "+" else rng.randint(1, min(9, old))
    return op, k, old + k if op == "+" else old - k


def _position(statements: list[str], var: str) -> int:
    return next(i for i, s in enumerate(statements) if s.startswith(f"{var} = "))
