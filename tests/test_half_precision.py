"""Half precision: statistics of bf16 and fp16 models within 2e-2 of fp32, and no NaN anywhere.

The tiny models of the conformance matrix (a plain causal one, one with windows and a softcap, one
with learned sinks) are loaded in each dtype from the same weights; interventions that renormalise
or divide by row masses must stay finite (they are computed in float32, in float64 where a
learned sink's share is involved). The real SmolLM2 in fp16 is checked too (slow).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from tests import conformance as C
from tokext.attention.collect import collect_attention_stats
from tokext.interventions import (
    AttentionTemperature,
    EarlyLayerEmulation,
    HeadAblation,
    SinkCalibration,
    SinkRebalance,
    intervention_effect,
)
from tokext.models.loading import load_model

FAMILIES = ["Llama", "Gemma 2", "gpt-oss"]
DTYPES = [torch.bfloat16, torch.float16]
INTERVENTIONS = [
    SinkCalibration(),
    SinkRebalance(),
    EarlyLayerEmulation(),
    AttentionTemperature(0.5),
    AttentionTemperature(2.0, hook="pattern"),
    HeadAblation([(1, 0), (2, 3)], "mean"),
]


@functools.cache
def _model(name: str, dtype: torch.dtype):
    return load_model(str(C.family_dir(name)), dtype=dtype)


def _summary(stats) -> dict[str, np.ndarray]:
    return {
        "received": stats.received[..., :8],
        "entropy": stats.entropy,
        "first": stats.first_token_mass,
        "sink": stats.learned_sink_mass,
        "row_sum": stats.row_sum,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_statistics_are_close_to_fp32(name, dtype):
    seqs = C.sequences()
    full = _summary(collect_attention_stats(_model(name, torch.float32), seqs, progress=False))
    half = _summary(collect_attention_stats(_model(name, dtype), seqs, progress=False))
    for key in full:
        assert np.isfinite(half[key]).all(), f"{name} {dtype}: NaN or inf in {key}"
        error = float(np.abs(half[key] - full[key]).max())
        assert error < 2e-2, f"{name} {dtype}: {key} differs from fp32 by {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_interventions_stay_finite_in_half_precision(name, dtype):
    model = _model(name, dtype)
    for iv in INTERVENTIONS:
        effect = intervention_effect(model, C.sequences(), iv)
        assert np.isfinite([effect.loss_before, effect.loss_after, effect.max_abs_delta_logit]).all(), (
            f"{name} {dtype}: {iv!r} gave {effect}"
        )
        assert effect.max_abs_delta_logit > 1e-3, f"{name} {dtype}: {iv!r} did not move the logits"


@pytest.mark.slow
def test_smollm2_fp16_interventions_have_finite_loss_changes():
    """With BOS first, rows put nearly all their mass on it, and in fp16 the rest underflows: ACT's
    ratio of freed mass to the rest was inf and the loss change NaN before edits ran in float32."""
    from tokext.evaluation.prompts import load_prompts

    model = load_model("smollm2-135m", dtype=torch.float16)
    bos = model.tokenizer.bos_token_id
    prompts = [[bos] + list(model.tokenizer(text).input_ids) for text in load_prompts(None, 4)]
    for iv in (SinkCalibration(), SinkRebalance()):
        effect = intervention_effect(model, prompts, iv)
        assert np.isfinite(effect.delta_loss) and np.isfinite(effect.max_abs_delta_logit), f"{iv!r}: {effect}"
