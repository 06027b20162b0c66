"""Early-layer attention emulation (Liao & Vargas, arXiv 2403.14932) as its authors released it.

Post-softmax, no renormalisation by default. In the source layer (decoder layer 0),
``M = pattern > threshold`` per batch item, head and query row, with each query's own key
removed. In every later layer ``l`` the entries under ``M`` are multiplied by
``1 + alpha * (1 - l / h)`` (``h`` = last layer index unless ``horizon`` is given). With a KV
cache the decode step's row of the source layer covers all cached keys, so cached generation
gives the tokens of recomputing the whole sequence.

Sliding windows: ``M`` holds what layer 0 attends to, so a windowed source layer boosts only keys
inside its window; when the source and an edited layer keep different keys in a KV cache (a window
cache and a full one), ``M`` is aligned by position (keys the source never saw are not boosted).
Learned sinks (gpt-oss): the sink's share is not touched; boosted rows sum to more than ``1 - s_i``
(with ``renormalize=True`` each row keeps its sum, so the sink keeps its share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokext.attention.engines.edits import FusedEdit, LayerCall
from tokext.errors import InputError, InterventionNotAppliedError, LayerIndexError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    align_keys,
    as_int_tuple,
    check_bool,
    check_number,
    is_int,
    rescale_rows,
)
from tokext.models.hooks import pattern_hook_name, resolve_layers


@dataclass(frozen=True, repr=False)
class EarlyLayerEmulation(Intervention):
    """Boost later layers' attention where the source layer attends (arXiv 2403.14932).

    Acts post-softmax on ``hook_pattern`` of ``layers`` (default: every layer after
    ``source_layer``); reads ``hook_pattern`` of ``source_layer``. Rows no longer sum to 1
    unless ``renormalize=True`` (then each row keeps its original sum). ``uniform=True``
    multiplies every entry of layer ``l`` by the factor: the first code release's behaviour,
    kept as an ablation. ``horizon=31`` reproduces the released code's hard-coded ``h``.

    >>> EarlyLayerEmulation(alpha=0.5)
    EarlyLayerEmulation(alpha=0.5)
    >>> round(EarlyLayerEmulation().factor(1, horizon=29), 4)
    1.1931
    """

    alpha: float = 0.2
    threshold: float = 0.01
    source_layer: int = 0
    horizon: float | None = None
    exclude_self: bool = True
    renormalize: bool = False
    uniform: bool = False
    layers: tuple[int, ...] | None = None

    def _check(self) -> None:
        check_number("alpha", self.alpha)
        check_number("threshold", self.threshold, low=0.0, high=1.0, high_open=True)
        if not is_int(self.source_layer) or self.source_layer < 0:
            raise InputError(f"source_layer must be a non-negative int, got {self.source_layer!r}")
        if self.horizon is not None:
            check_number("horizon", self.horizon, low=0.0, low_open=True)
        for name in ("exclude_self", "renormalize", "uniform"):
            check_bool(name, getattr(self, name))
        if self.uniform and self.renormalize:
            raise InputError("uniform=True with renormalize=True is the identity: choose one")
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))

    def factor(self, layer: int, horizon: float) -> float:
        """Multiplier ``1 + alpha * (1 - layer / horizon)`` of ``layer``."""
        return 1.0 + self.alpha * (1.0 - layer / horizon)

    def resolved_horizon(self, model: Any) -> float:
        """The horizon ``H`` of the decay: the given one, else the model's last layer index."""
        return float(self.horizon) if self.horizon is not None else float(int(model.cfg.n_layers) - 1)

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        source = resolve_layers(model, self.source_layer)[0]
        if self.layers is None:
            layers = list(range(source + 1, int(model.cfg.n_layers)))
        else:
            layers = resolve_layers(model, list(self.layers))
        if not layers:
            raise LayerIndexError(
                f"no layer after source_layer={source} to edit (the model has {int(model.cfg.n_layers)} layers)"
            )
        if min(layers) <= source:
            raise LayerIndexError(f"layers {layers} must all come after source_layer={source}")
        horizon = self.resolved_horizon(model)
        if horizon <= 0:
            raise InputError("horizon is 0 (one-layer model?): pass horizon explicitly")
        negative = [layer for layer in layers if self.factor(layer, horizon) < 0]
        if negative:
            raise InputError(f"alpha={self.alpha} makes the factor negative in layers {negative}")
        return layers

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        layers = self.edited_layers(model)
        source = resolve_layers(model, self.source_layer)[0]
        horizon = self.resolved_horizon(model)
        last = max(layers)
        state: dict[str, Any] = {"mask": None, "keys": None, "moved": {}}  # moved: the mask's copy per other device
        threshold, exclude_self = self.threshold, self.exclude_self

        def record_mask(pattern: torch.Tensor, hook: Any) -> None:
            # kept as 0/1 in the pattern's dtype: with a Bool operand every later layer's addcmul
            # casts element by element instead of running vectorised
            mask = (pattern > threshold).to(pattern.dtype)
            if exclude_self:  # the key at the query's own position
                mask.diagonal(offset=ctx.diagonal_offset(pattern), dim1=-2, dim2=-1).fill_(0)
            state["mask"], state["keys"], state["moved"] = mask, ctx.key_positions(pattern), {}

        record_mask.stream_id = record_mask  # type: ignore[attr-defined]  # a function attribute: what the streaming engine replays
        # in the fused streaming kernel: the keys above the threshold, as a short list per row
        record_mask.stream_fused = lambda call: FusedEdit(record=(threshold, exclude_self))  # type: ignore[attr-defined]

        def make_boost(layer: int) -> Any:
            gain = self.factor(layer, horizon)
            name = pattern_hook_name(layer)

            def boost(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
                inplace = ctx.inplace_ok(name, pattern)
                if self.uniform:
                    return pattern.mul_(gain) if inplace else pattern * gain
                mask = state["mask"]
                if mask is not None and mask.device != pattern.device:  # layers on several devices
                    if pattern.device not in state["moved"]:
                        state["moved"][pattern.device] = mask.to(pattern.device)
                    mask = state["moved"][pattern.device]
                if layer == last:
                    state["mask"], state["moved"] = None, {}  # keep no mask alive between forward passes
                if mask is not None and mask.shape[:-1] == pattern.shape[:-1]:
                    mask = align_keys(mask, state["keys"], ctx.key_positions(pattern))
                if mask is None or mask.shape != pattern.shape:
                    raise InterventionNotAppliedError(
                        f"{self!r}: layer {layer} ran without the source layer {source}'s mask for this "
                        f"forward pass (got {None if mask is None else tuple(mask.shape)}, need "
                        f"{tuple(pattern.shape)}); do not start forward passes after the source layer"
                    )
                original = pattern.sum(-1, keepdim=True) if self.renormalize else None
                if inplace:
                    edited = pattern.addcmul_(pattern, mask.to(pattern.dtype), value=gain - 1.0)
                else:
                    edited = torch.addcmul(pattern, pattern, mask.to(pattern.dtype), value=gain - 1.0)
                if original is not None:
                    edited = rescale_rows(edited, original, True)
                return edited

            def fused(call: LayerCall) -> FusedEdit | None:
                """The same edit in the fused streaming kernel: the source layer's recorded keys of each
                row times the gain (the record is read when the kernel runs; None there: pure torch)."""
                if layer == last:
                    state["mask"], state["moved"] = None, {}
                return FusedEdit(
                    boost_gain=torch.full((call.heads,), gain),
                    boost_source=(source, record_mask),
                    boost_renormalize=self.renormalize,
                )

            if not self.uniform:
                boost.stream_source, boost.stream_recorder = source, record_mask  # type: ignore[attr-defined]
                boost.stream_fused = fused  # type: ignore[attr-defined]
            return boost

        hooks: Hooks = [] if self.uniform else [(pattern_hook_name(source), record_mask)]
        hooks += [(pattern_hook_name(layer), make_boost(layer)) for layer in layers]
        return hooks
