"""Layer-wise attention profiles of a model with and without interventions.

For each intervention: the change in next-token loss and max |delta logit| on a prompt set, and
the per-layer first-token mass, entropy and raw row sum measured by
:func:`tokext.collect_attention_stats` inside :func:`tokext.intervene` (the statistics hooks attach
after the intervention's, so they see the edited pattern, renormalised per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from tokext.attention.collect import collect_attention_stats
from tokext.interventions import Intervention, intervene, intervention_effect


def default_interventions(n_layers: int, n_heads: int) -> list[Intervention]:
    """The interventions at their defaults (values chosen where a parameter has no default)."""
    from tokext.interventions import (
        AttentionTemperature,
        EarlyLayerEmulation,
        HeadAblation,
        PatternPatch,
        SinkCalibration,
        SinkRebalance,
        ZeroTuning,
    )

    mid = n_layers // 2
    return [
        EarlyLayerEmulation(),
        EarlyLayerEmulation(uniform=True),
        EarlyLayerEmulation(renormalize=True),
        SinkCalibration(),
        SinkRebalance(),
        SinkRebalance("categories"),
        AttentionTemperature(2.0),
        PatternPatch(0, (1,)),
        PatternPatch(0, tuple(range(1, n_layers))),
        HeadAblation(tuple((mid, h) for h in range(n_heads)), "zero"),
        ZeroTuning(gamma=0.5),  # every head, as the authors' code by default, in the paper's direction for QA
    ]


def intervention_profiles(
    model: Any,
    prompts: Sequence[str],
    interventions: Sequence[Intervention],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, by_layer): one summary row per intervention; one by-layer row per (intervention, layer).

    The baseline is the row with intervention ``"baseline"``.
    """

    def profile(*ivs: Intervention):
        with intervene(model, *ivs):
            stats = collect_attention_stats(model, prompts, batch_size=batch_size, progress=False)
        return stats

    base = profile()
    layers, summary = [], []

    def add_layers(name: str, stats) -> None:
        layers.append(
            pd.DataFrame(
                {
                    "intervention": name,
                    "layer": stats.layers,
                    "first_token_mass": stats.first_token_mass.mean(1),
                    "entropy": stats.entropy.mean(1),
                    "row_sum": stats.row_sum.mean(1),
                }
            )
        )

    add_layers("baseline", base)
    for iv in interventions:
        with torch.inference_mode():
            effect = intervention_effect(model, prompts, iv, batch_size=batch_size)
        stats = profile(iv)
        add_layers(repr(iv), stats)
        summary.append(
            {
                "intervention": repr(iv),
                "loss_without": effect.loss_before,
                "loss_with": effect.loss_after,
                "delta_loss": effect.delta_loss,
                "max_abs_delta_logit": effect.max_abs_delta_logit,
                "first_mass_without": float(base.first_token_mass.mean()),
                "first_mass_with": float(stats.first_token_mass.mean()),
                "delta_first_mass": float(stats.first_token_mass.mean() - base.first_token_mass.mean()),
                "mean_row_sum": float(stats.row_sum.mean()),
                "n_tokens": effect.n_tokens,
            }
        )
        if progress:
            print(f"  {repr(iv)}: loss {effect.loss_before:.4f} -> {effect.loss_after:.4f}", flush=True)
    return pd.DataFrame(summary), pd.concat(layers, ignore_index=True)
