"""tokext: find where attention goes wrong in transformer LMs (sinks, collapsing entropy), rewrite
it in flight, and measure what that does to reasoning. Built on TransformerLens 4.

Heavy modules (torch models, pandas, seaborn) load on first use, so ``import tokext`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokext.version import __version__

_EXPORTS = {
    "load_model": "tokext.models.loading",
    "native_model": "tokext.models.native",
    "model_info": "tokext.models.info",
    "collect_attention_stats": "tokext.attention.collect",
    "log_position_bins": "tokext.attention.positions",
    "AttentionStats": "tokext.attention.stats",
    "received_attention": "tokext.attention.metrics",
    "row_entropy": "tokext.attention.metrics",
    "category_mass": "tokext.attention.metrics",
    "sink_rate": "tokext.attention.metrics",
    "hidden_sink_mask": "tokext.attention.metrics",
    "learned_sink_share": "tokext.attention.metrics",
    "token_category": "tokext.attention.metrics",
    "CATEGORIES": "tokext.attention.metrics",
    "visible_keys": "tokext.attention.masks",
    "TokextError": "tokext.errors",
    "intervene": "tokext.interventions",
    "fwd_hooks": "tokext.interventions",
    "intervention_effect": "tokext.interventions",
    "mean_loss": "tokext.interventions",
    "Intervention": "tokext.interventions",
    "EarlyLayerEmulation": "tokext.interventions",
    "SinkCalibration": "tokext.interventions",
    "select_heads_greedy": "tokext.interventions",
    "SinkRebalance": "tokext.interventions",
    "SinkValueRemoval": "tokext.interventions",
    "AttentionTemperature": "tokext.interventions",
    "PatternPatch": "tokext.interventions",
    "HeadAblation": "tokext.interventions",
    "ZeroTuning": "tokext.interventions",
    "ResidualPatch": "tokext.interventions",
    "MassiveActivationAblation": "tokext.interventions",
    "HeadOutputAblation": "tokext.interventions",
    "calibrate_massive_ablation": "tokext.interventions",
    "calibrate_head_means": "tokext.interventions",
    "perplexity": "tokext.studies.perplexity",
    "calibrate_zerotuning": "tokext.interventions",
    "greedy_generate": "tokext.evaluation.generation",
    "probe_inputs": "tokext.evaluation.probe_inputs",
    "explore": "tokext.viz.explorer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
