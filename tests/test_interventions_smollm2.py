"""On the real SmolLM2-135M: every intervention at its default settings measurably moves the logits.

The measured loss with and without each intervention is printed (``pytest -s``) and attached to
the test report (``record_property``); experiments/intervention_effects.py makes the full table.
"""

from __future__ import annotations

import pytest

from tokext.evaluation.prompts import builtin_prompts
from tokext.interventions.intervene import intervention_effect
from tokext.studies.profiles import default_interventions

pytestmark = pytest.mark.slow

DEFAULTS = default_interventions(n_layers=30, n_heads=9)  # SmolLM2-135M: 30 layers, 9 query heads


def _prompts(n: int = 4) -> list[str]:
    return builtin_prompts()[:n]


@pytest.mark.parametrize("iv", DEFAULTS, ids=repr)
def test_each_intervention_moves_smollm2(smollm2, iv, record_property):
    effect = intervention_effect(smollm2, _prompts(), iv)
    record_property("loss_before", effect.loss_before)
    record_property("loss_after", effect.loss_after)
    print(
        f"\n{effect.intervention}: loss {effect.loss_before:.4f} -> {effect.loss_after:.4f} "
        f"(delta {effect.delta_loss:+.4f}), max |delta logit| {effect.max_abs_delta_logit:.4f}"
    )
    assert effect.max_abs_delta_logit > 1e-2, f"{iv!r} did not move SmolLM2's logits"
    assert 0 < effect.loss_before < 10 and effect.loss_after > 0
