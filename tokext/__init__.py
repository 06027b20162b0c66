"""tokext: find where attention goes wrong in transformer LMs (sinks, collapsing entropy), rewrite
it in flight, and measure what that does to reasoning. Built on TransformerLens 4.

Heavy modules (torch models, pandas, seaborn) load on first use, so ``import tokext`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "tokext.models",
    "native_model": "tokext.models",
    "model_info": "tokext.models",
    "collect_attention_stats": "tokext.collect",
    "AttentionStats": "tokext.stats",
    "received_attention": "tokext.metrics",
    "row_entropy": "tokext.metrics",
    "category_mass": "tokext.metrics",
    "sink_rate": "tokext.metrics",
    "hidden_sink_mask": "tokext.metrics",
    "token_category": "tokext.metrics",
    "CATEGORIES": "tokext.metrics",
    "visible_keys": "tokext.masks",
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
    "AttentionTemperature": "tokext.interventions",
    "PatternPatch": "tokext.interventions",
    "HeadAblation": "tokext.interventions",
    "greedy_generate": "tokext.generation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
