"""Multi-step integer arithmetic, in two forms, with the chain of intermediate results as the CoT.

* ``chain`` (task ``"arithmetic"``): "Start with 7. Add 5. Multiply by 2. Subtract 3. What is the
  result?" Values stay in 1..200, so no negative numbers appear.
* ``expression`` (task ``"arithmetic_expr"``): "Compute 3 + 4 * 2 - 5." with the usual precedence
  (``*`` before ``+``/``-``); the answer may be negative.

Level ``L`` has ``L + 1`` operations (2..5), so even level 1 needs one intermediate result.
"""

from __future__ import annotations

import random
from typing import Any

from tokext.errors import InputError
from tokext.evaluation.tasks.base import Task

FORMS: tuple[str, ...] = ("chain", "expression")
_MAX_VALUE = 200
_VERB = {"+": "Add {k}.", "-": "Subtract {k}.", "*": "Multiply by {k}."}


def n_operations(level: int) -> int:
    """How many operations a problem at ``level`` has."""
    return level + 1


class Arithmetic(Task):
    """Seeded multi-step arithmetic problems (see the module docstring for the two forms)."""

    def __init__(self, form: str = "chain") -> None:
        if form not in FORMS:
            raise InputError(f"arithmetic form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.name = "arithmetic" if form == "chain" else "arithmetic_expr"
        self.description = (
            "chain of operations on a running integer ('Start with 7. Add 5. ...')"
            if form == "chain"
            else "integer expression with precedence ('Compute 3 + 4 * 2 - 5.')"
        )

    def make(self, rng: random.Random, level: int) -> tuple[str, str, str, dict[str, Any]]:
        """One problem at ``level``: ``(question, answer, cot_solution, meta)``."""
        if self.form == "chain":
            return _make_chain(rng, n_operations(level))
        return _make_expression(rng, n_operations(level))


def _make_chain(rng: random.Random, n_ops: int) -> tuple[str, str, str, dict[str, Any]]:
    value = rng.randint(2, 20)
    sentences = [f"Start with {value}."]
    steps: list[str] = []
    values = [value]
    for _ in range(n_ops):
        ok = {"+": value < _MAX_VALUE, "-": value >= 2, "*": 2 * value <= _MAX_VALUE}
        op = rng.choice([o for o, allowed in ok.items() if allowed])
        if op == "+":
            k = rng.randint(1, min(9, _MAX_VALUE - value))
            new = value + k
        elif op == "-":
            k = rng.randint(1, min(9, value - 1))  # the running value stays >= 1
            new = value - k
        else:
            k = rng.randint(2, max(2, min(5, _MAX_VALUE // value)))
            new = value * k
        sentences.append(_VERB[op].format(k=k))
        steps.append(f"{value} {op} {k} = {new}")
        value = new
        values.append(value)
    question = " ".join(sentences) + " What is the result?"
    meta = {"form": "chain", "n_ops": n_ops, "values": values}
    return question, str(value), "\n".join(steps), meta


def _make_expression(rng: random.Random, n_ops: int) -> tuple[str, str, str, dict[str, Any]]:
    operands = [rng.randint(1, 9) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    expression = " ".join(str(tok) for pair in zip(operands, ops + [""]) for tok in pair if tok != "")
    answer, steps = evaluate_with_steps(operands, ops)
    meta = {"form": "expression", "n_ops": n_ops, "expression": expression}
    return f"Compute {expression}.", str(answer), "\n".join(steps), meta


def evaluate_with_steps(operands: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Evaluate ``operands`` joined by ``ops`` (``*`` first, then ``+``/``-`` left to right).

    Returns the value and one ``"a op b = c"`` line per operation, in the order a person would work.
    """
    if len(operands) != len(ops) + 1:
        raise InputError(f"{len(operands)} operands need {len(operands) - 1} operators, got {len(ops)}")
    vals, rest, steps = list(operands), list(ops), []
    while "*" in rest:
        i = rest.index("*")
        product = vals[i] * vals[i + 1]
        steps.append(f"{vals[i]} * {vals[i + 1]} = {product}")
        vals[i : i + 2] = [product]
        del rest[i]
    total = vals[0]
    for op, v in zip(rest, vals[1:]):
        new = total + v if op == "+" else total - v
        steps.append(f"{total} {op} {v} = {new}")
        total = new
    return total, steps
