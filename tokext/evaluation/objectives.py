"""Calibration objectives on task items: ``score(model) -> float`` callables, lower is better.

They plug into :func:`tokext.interventions.calibrate_zerotuning` (ZeroTuning's supervised and
unsupervised modes) and :func:`tokext.interventions.select_heads_greedy` (ACT), which call them
with the interventions under trial applied. Each takes an :class:`~tokext.evaluation.spec.EvalSpec`
(or a dict of its fields) for the prompt form, and loads its items once, when it is built; use a
``seed`` other than the evaluation's so calibration and test items differ.

- :func:`gold_answer_nll` (supervised): the mean NLL of the gold answer after the prompt, the
  ``loss`` of :func:`tokext.evaluation.evaluate.evaluate` on the same spec: for multiple choice the
  gold letter's NLL (letter scoring), for the reasoning tasks the teacher-forced mean per-token NLL
  of the gold answer (or worked solution, with ``cot``).
- :func:`answer_entropy` (unsupervised: no labels used): the mean entropy, in nats, of the
  next-token distribution at the answer position, over the option letters (renormalised) for
  multiple choice, or over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tokext.errors import InputError
from tokext.evaluation.spec import EvalSpec

Objective = Callable[[Any], float]
OVER = ("choices", "vocab")


def gold_answer_nll(
    spec: EvalSpec | dict[str, Any], *, items: Sequence[Any] | None = None, batch_size: int = 8
) -> Objective:
    """Supervised objective: mean NLL of the gold answer on ``spec``'s items (lower is better).

    ``items``: the items to use instead of ``spec.load()`` (the spec still gives the prompt form).

    >>> objective = gold_answer_nll({"task": "lookup", "level": 1, "n": 4, "seed": 1})
    >>> callable(objective)
    True
    """
    spec, items = _spec_items(spec, items)

    def score(model: Any) -> float:
        from tokext.evaluation.evaluate import continuation_logprobs, encode_pair, model_tokenizer, score_letters
        from tokext.evaluation.tasks import target

        if spec.method == "letter":
            return float(score_letters(model, items, batch_size=batch_size, progress=False)["loss"].mean())
        tok = model_tokenizer(model)
        pairs = [encode_pair(tok, text, target(ex, spec.cot)) for text, ex in zip(_prompts(spec, items), items)]
        return float(np.mean([-lp.mean() for lp in continuation_logprobs(model, pairs, batch_size=batch_size)]))

    return score


def answer_entropy(
    spec: EvalSpec | dict[str, Any], *, over: str | None = None, items: Sequence[Any] | None = None, batch_size: int = 8
) -> Objective:
    """Unsupervised objective: mean next-token entropy (nats) at the answer position of ``spec``'s prompts.

    ``over``: ``"choices"`` (multiple choice only: the option letters' probabilities renormalised)
    or ``"vocab"`` (the full distribution); default ``"choices"`` for multiple choice, ``"vocab"``
    for the reasoning tasks. The gold answers are never read. ``items`` as in :func:`gold_answer_nll`.
    """
    spec, items = _spec_items(spec, items)
    over = over if over is not None else ("choices" if spec.method == "letter" else "vocab")
    if over not in OVER:
        raise InputError(f"over must be one of {OVER}, got {over!r}")
    if over == "choices" and spec.method != "letter":
        raise InputError(
            f"over='choices' needs multiple-choice items (method 'letter'); task {spec.task!r} has "
            "free answers: use over='vocab'"
        )

    def score(model: Any) -> float:
        from tokext.evaluation.evaluate import forward_batches, model_tokenizer, score_letters
        from tokext.evaluation.mc import LETTERS

        if over == "choices":
            table = score_letters(model, items, batch_size=batch_size, progress=False)
            entropies = []
            for item, row in zip(items, table.itertuples(index=False)):
                logp = torch.tensor(
                    [getattr(row, f"logp_{LETTERS[j]}") for j in range(len(item.choices))], dtype=torch.float64
                )
                entropies.append(_entropy(logp.log_softmax(-1)))
            return float(np.mean(entropies))
        tok = model_tokenizer(model)
        seqs = [list(tok(text).input_ids) for text in _prompts(spec, items)]

        def take(logits: torch.Tensor, length: int, index: int) -> float:
            return _entropy(logits[length - 1].double().log_softmax(-1))

        return float(np.mean(forward_batches(model, seqs, batch_size, take, False, "entropy")))

    return score


def _entropy(logp: torch.Tensor) -> float:
    return float(-(logp.exp() * logp).sum())


def _spec_items(spec: EvalSpec | dict[str, Any], items: Sequence[Any] | None) -> tuple[EvalSpec, list[Any]]:
    if isinstance(spec, dict):
        spec = EvalSpec(**spec)
    if not isinstance(spec, EvalSpec):
        raise InputError(f"an objective takes an EvalSpec or a dict of its fields, got {spec!r}")
    if spec.method not in ("letter", "generate") or spec.task == "organism":
        raise InputError(
            f"calibration objectives score letter-scored multiple choice and the reasoning tasks, "
            f"not task {spec.task!r} with method {spec.method!r}"
        )
    items = list(items) if items is not None else spec.load()
    if not items:
        raise InputError(f"{spec.task!r} gave no items to calibrate on")
    return spec, items


def _prompts(spec: EvalSpec, items: list[Any]) -> list[str]:
    """The prompts exactly as :func:`tokext.evaluation.evaluate.evaluate` builds them for ``spec``."""
    from tokext.evaluation.mc import letter_prompt
    from tokext.evaluation.tasks import prompt

    if spec.method == "letter":
        return [letter_prompt(item) for item in items]
    return [prompt(ex, spec.cot, shots=spec.shots, demo_seed=spec.seed) for ex in items]
