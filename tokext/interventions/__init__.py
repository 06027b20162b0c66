"""Room 3, interventions: rewriting attention in flight. The paper's early-layer emulation
(arXiv 2403.14932) and its neighbours, applied with ``with intervene(model, *interventions):``.

Every intervention is a frozen dataclass of hyperparameters acting on
``blocks.{l}.attn.hook_pattern`` [batch, head, query, key]:

- :class:`EarlyLayerEmulation`: boost later layers where layer 0 attends (post-softmax, no renormalisation);
- :class:`SinkCalibration`: ACT, damp hidden sinks and redistribute (rows keep their sum);
- :class:`SinkRebalance`: scale attention to the first token, token categories or positions, renormalise;
- :class:`AttentionTemperature`: exact softmax temperature;
- :class:`PatternPatch`: copy a source layer's pattern into later layers;
- :class:`HeadAblation`: zero / mean / first-token ablation of heads;
- :class:`SinkValueRemoval`: the first token's value contribution removed from the later rows (the no-op test);
- :class:`ZeroTuning`: per-head scaling of the initial token's attention, renormalised, and its
  calibration :func:`calibrate_zerotuning`.

Three act outside the pattern: :class:`ResidualPatch` and :class:`MassiveActivationAblation` on a
block's output (``hook_resid_post``, :mod:`~tokext.interventions.residual`), :class:`HeadOutputAblation`
on a head's output before W_O (``hook_z``, :mod:`~tokext.interventions.head_output`); their
calibrations (:func:`calibrate_massive_ablation`, :func:`calibrate_head_means`) are in
:mod:`~tokext.interventions.output_calibration`.

:mod:`~tokext.interventions.base` holds what they share (the per-run context, the binding of a
list of interventions to a model); :mod:`~tokext.interventions.intervene` the ``with`` block and
the measured effect on the logits; :mod:`~tokext.interventions.parse` interventions written as text
(``"EarlyLayerEmulation(alpha=0.2)"``, for command lines), parsed without evaluating anything;
:mod:`~tokext.interventions.search` the scoring of trials on a calibration set that ACT's head
selection and ZeroTuning's calibration share.

May import: :mod:`tokext.attention`, :mod:`tokext.models` and :mod:`tokext.errors`.
"""

from tokext.interventions.ablation import HeadAblation
from tokext.interventions.base import Intervention, RunContext, fwd_hooks
from tokext.interventions.calibration import HeadSelection, SinkCalibration, select_heads_greedy
from tokext.interventions.emulation import EarlyLayerEmulation
from tokext.interventions.head_output import HeadOutputAblation
from tokext.interventions.intervene import (
    InterventionEffect,
    InterventionRun,
    intervene,
    intervention_effect,
    mean_loss,
)
from tokext.interventions.output_calibration import calibrate_head_means, calibrate_massive_ablation
from tokext.interventions.parse import intervention_classes, parse_interventions
from tokext.interventions.patching import PatternPatch
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.residual import MassiveActivationAblation, ResidualPatch
from tokext.interventions.sink_value import SinkValueRemoval
from tokext.interventions.temperature import AttentionTemperature
from tokext.interventions.zerotuning import ZeroTuning, ZeroTuningCalibration, calibrate_zerotuning

__all__ = [
    "AttentionTemperature",
    "EarlyLayerEmulation",
    "HeadAblation",
    "HeadOutputAblation",
    "HeadSelection",
    "Intervention",
    "InterventionEffect",
    "InterventionRun",
    "MassiveActivationAblation",
    "PatternPatch",
    "ResidualPatch",
    "RunContext",
    "SinkCalibration",
    "SinkRebalance",
    "SinkValueRemoval",
    "ZeroTuning",
    "ZeroTuningCalibration",
    "calibrate_head_means",
    "calibrate_massive_ablation",
    "calibrate_zerotuning",
    "fwd_hooks",
    "intervene",
    "intervention_classes",
    "intervention_effect",
    "mean_loss",
    "parse_interventions",
    "select_heads_greedy",
]
