"""Scoring interventions on a calibration set: what ACT's head selection and ZeroTuning's calibration share.

A calibration objective is a callable ``score(model) -> float`` (lower is better) evaluated inside
:func:`tokext.intervene`; ready-made ones (the mean next-token loss here,
:mod:`tokext.evaluation.objectives` for labelled and unlabelled task items) live where their data
does. :func:`score_with` evaluates one trial; :func:`score_each` tries every candidate on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from tokext.errors import InputError
from tokext.interventions.base import Intervention

Score = Callable[[Any], float]
Candidate = TypeVar("Candidate", bound=Hashable)


def score_with(model: Any, score: Score, *interventions: Intervention) -> float:
    """``score(model)`` with ``interventions`` applied (none: the baseline), without gradients.

    Raises :class:`InputError` when the objective is not a finite number, which no search can use.
    """
    from contextlib import nullcontext

    from tokext.interventions.intervene import intervene

    with torch.inference_mode(), intervene(model, *interventions) if interventions else nullcontext():
        value = score(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the calibration score must return a number, got {value!r}") from None
    if not math.isfinite(value):
        shown = ", ".join(map(repr, interventions)) or "no intervention"
        raise InputError(f"the calibration score returned {value} with {shown}: it must be finite")
    return value


def score_each(
    model: Any,
    score: Score,
    candidates: Sequence[Candidate],
    build: Callable[[Candidate], Intervention],
    *,
    progress: bool = False,
    desc: str = "calibration",
) -> dict[Candidate, float]:
    """``candidate -> score(model)`` with ``build(candidate)`` alone applied, in order."""
    from tqdm.auto import tqdm

    return {c: score_with(model, score, build(c)) for c in tqdm(candidates, desc=desc, disable=not progress)}


def default_score(inputs: Any, batch_size: int) -> Score:
    """The mean next-token loss on ``inputs`` (strings, a token tensor or token lists)."""
    from tokext.interventions.intervene import mean_loss

    if inputs is None:
        raise InputError("give the calibration inputs (texts or tokens), or a score(model) -> float")

    def score(model: Any) -> float:
        return mean_loss(model, inputs, batch_size=batch_size)

    return score


def all_heads(model: Any) -> list[tuple[int, int]]:
    """Every (layer, head) pair of ``model``, layer-major."""
    return [(layer, head) for layer in range(int(model.cfg.n_layers)) for head in range(int(model.cfg.n_heads))]


def distinct(name: str, values: Iterable[Any]) -> list[Any]:
    """``values`` as a list, refusing repeats (a repeated candidate would be tried twice)."""
    values = list(values)
    seen: set = set()
    for value in values:
        if value in seen:
            raise InputError(f"{name} lists {value!r} twice")
        seen.add(value)
    return values
