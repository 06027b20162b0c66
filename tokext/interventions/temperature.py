"""Softmax temperature, exactly: ``softmax(scores / T)``.

Where edits to the pre-softmax ``hook_attn_scores`` reach the output (HF-backed bridges such as
Llama/SmolLM2 and GPT-2; :func:`tokext.models.check_score_edits`) the scores are divided by ``T``.
A score edit acts before every post-softmax hook of its layer, so to keep the order of
:func:`tokext.intervene` a layer is tempered on its pattern instead wherever something must act
first there: an intervention listed earlier that hooks (edits or reads) that layer's pattern, or
a hook already attached to it (an enclosing ``intervene`` block). Elsewhere (TransformerLens-native
models, whose score edits are discarded) the post-softmax pattern is tempered too, at the cost of
a log and an exp per entry (about three softmaxes):

For a softmax row ``p = softmax(s)`` over the visible keys, ``p^(1/T)`` renormalised equals
``softmax(s / T)``: ``log p = s - logsumexp(s)`` and the constant cancels. It is computed in log
space (``softmax(log p / T)``), so small temperatures do not underflow; keys with ``p = 0``
(causal, window and padding zeros) stay 0. Each row keeps its original sum (1 for plain softmax).

Softcapping (Gemma 2): the cap comes first, so the temperature gives
``softmax(cap * tanh(s / cap) / T)``. ``hook_attn_scores`` holds the capped scores, and the
pattern path tempers the softmax of the capped scores, so both paths give exactly that.

Learned sinks (gpt-oss): the sink logit ``z`` is divided by ``T`` too, ``softmax([s, z] / T)`` with
the sink's column dropped afterwards. It joins the softmax after ``hook_attn_scores``, where it is
out of reach, but ``softmax([s / T + z (1 - 1/T), z])`` is the same distribution, so the score path
divides the scores by ``T`` and adds the head's ``z (1 - 1/T)`` (``z`` read from the attention
module's ``sinks`` parameter). The pattern path tempers the row with the sink's share
``1 - sum_j p_ij`` as one more entry; that is exact too, but a share below float32's resolution
is lost in the pattern, so the score path is preferred there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokext.attention.engines.edits import FusedEdit, LayerCall, head_vector
from tokext.errors import InputError, UneditableAttentionError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    as_head_pairs,
    as_int_tuple,
    check_number,
    head_index,
    head_selection,
    in_float64,
    learned_sink_share,
    on_heads,
)
from tokext.models.hooks import pattern_hook_name

HOOKS = ("auto", "scores", "pattern")


def scores_hook_name(layer: int) -> str:
    """Name of the pre-softmax (scaled, masked) attention scores hook of ``layer``."""
    return f"blocks.{layer}.attn.hook_attn_scores"


@dataclass(frozen=True, repr=False)
class AttentionTemperature(Intervention):
    """Attention softmax temperature ``T``: T > 1 flattens, T < 1 sharpens (pre-softmax equivalent).

    >>> AttentionTemperature(2.0, layers=(1,))
    AttentionTemperature(temperature=2.0, layers=(1,))
    """

    temperature: float
    layers: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None
    hook: str = "auto"  # "scores" (pre-softmax), "pattern" (post-softmax), "auto": scores where edits land

    def _check(self) -> None:
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        if self.hook not in HOOKS:
            raise InputError(f"hook must be one of {HOOKS}, got {self.hook!r}")
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(head_selection(model, self.layers, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        from tokext.models.probes import check_score_edits

        selection = head_selection(model, self.layers, self.heads)
        on_scores: set[int] = set()
        if self.hook != "pattern" and isinstance(model, torch.nn.Module):  # (reference tests pass stand-ins)
            lands = dict(check_score_edits(model))
            family = ctx.layout.family if ctx.layout is not None else type(model).__name__
            blocked = [layer for layer in selection if not lands.get(layer, False)]
            if blocked and self.hook == "scores":
                raise UneditableAttentionError(
                    f"{self!r}: on {family}, edits to hook_attn_scores do not reach the "
                    f"output in layers {blocked}: use hook='pattern' or 'auto'"
                )
            unreadable = [
                layer for layer in selection if ctx.attention(layer).learned_sink and _sink_logits(model, layer) is None
            ]
            if unreadable and self.hook == "scores":
                raise UneditableAttentionError(
                    f"{self!r}: on {family}, layers {unreadable} add a learned sink logit "
                    "that tokext cannot read, so dividing the scores would leave the sink "
                    "untempered: use hook='pattern' or 'auto'"
                )
            for layer in unreadable:
                lands[layer] = False
            first_there = [layer for layer in selection if self._acts_after_others(model, layer, ctx)]
            if first_there and self.hook == "scores":
                raise InputError(
                    f"{self!r}: layers {first_there} have pattern hooks that must act before this "
                    "temperature (an earlier intervention or an enclosing block), and a score "
                    "edit would act before them: use hook='auto' or 'pattern', or list it first"
                )
            on_scores = {layer for layer in selection if lands.get(layer, False) and layer not in first_there}
        return [
            (scores_hook_name(layer), self._scores_hook(model, layer, heads, ctx))
            if layer in on_scores
            else (pattern_hook_name(layer), self._hook(layer, heads, ctx))
            for layer, heads in selection.items()
        ]

    @staticmethod
    def _acts_after_others(model: Any, layer: int, ctx: RunContext) -> bool:
        """Whether hooks on ``layer``'s pattern must run before this temperature."""
        name = pattern_hook_name(layer)
        point = getattr(model, "hook_dict", {}).get(name)
        return name in ctx.earlier_points or name in ctx.enclosing_points or bool(point is not None and point.fwd_hooks)

    def _scores_hook(self, model: Any, layer: int, heads: list[int] | None, ctx: RunContext) -> Callable:
        """``scores / T`` before the softmax: the same pattern as :func:`tempered` at the cost of
        one multiplication (used where score edits reach the output: HF-backed bridges)."""
        name = scores_hook_name(layer)
        inverse = 1.0 / float(self.temperature)
        sink = _sink_logits(model, layer) if ctx.attention(layer).learned_sink else None
        shift = None if sink is None else (sink.detach().float() * (1.0 - inverse))  # [head]

        def edit(sub: torch.Tensor, inplace: bool, offset: torch.Tensor | None = None) -> torch.Tensor:
            lowest = torch.finfo(sub.dtype).min
            out = sub.mul_(inverse) if inplace else sub * inverse
            if offset is not None:  # the untouched sink logit z: scores / T + z (1 - 1/T)
                out = out.add_(offset.to(out)[None, :, None, None])
            # masked entries hold -inf or the dtype's minimum; keep a fully masked row finite
            return out.clamp_(min=lowest) if inverse > 1.0 or offset is not None else out

        def hook(scores: torch.Tensor, hook: Any) -> torch.Tensor:
            index = head_index(heads, scores.device)
            offset = None if shift is None else (shift if index is None else shift.to(scores.device)[index])
            return on_heads(
                scores, index, ctx.inplace_ok(name, scores), lambda sub, inplace: edit(sub, inplace, offset)
            )

        def fused(call: LayerCall) -> FusedEdit:
            """The same edit in the fused streaming kernel: a scale (and a sink's shift) per head."""
            scale = head_vector(heads, call.heads, inverse, 1.0)
            if shift is None:
                return FusedEdit(score_scale=scale)
            selected = head_vector(heads, call.heads, 1.0, 0.0)
            return FusedEdit(score_scale=scale, score_shift=shift.cpu() * selected)

        hook.stream_fused = fused  # type: ignore[attr-defined]
        return hook

    def _hook(self, layer: int, heads: list[int] | None, ctx: RunContext) -> Callable:
        name = pattern_hook_name(layer)
        inverse = 1.0 / float(self.temperature)

        learned = ctx.attention(layer).learned_sink

        def edit(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
            return tempered(sub, inverse, inplace)

        @in_float64
        def edit_with_sink(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
            full = torch.cat([sub, learned_sink_share(sub)], dim=-1)  # the sink's share: one more entry
            return tempered(full, inverse, True)[..., :-1]

        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            return on_heads(
                pattern,
                head_index(heads, pattern.device),
                ctx.inplace_ok(name, pattern),
                edit_with_sink if learned else edit,
            )

        return hook


def tempered(pattern: torch.Tensor, inverse_temperature: float, inplace: bool = False) -> torch.Tensor:
    """``pattern^(1/T)`` renormalised to each row's original sum.

    The power is taken as ``exp(log(p) / T)`` (zeros stay zero: ``exp(-inf) = 0``), which on CPU
    is about three times faster than ``Tensor.pow`` with a fractional exponent, and done in place
    when ``inplace`` allows it. For ``T < 1`` each row's maximum is subtracted before the ``exp``,
    so rows do not underflow to zero.
    """
    work = pattern if pattern.dtype in (torch.float32, torch.float64) else pattern.float()
    grad = torch.is_grad_enabled() and work.requires_grad  # autograd needs the intermediate tensors
    inplace = inplace and work is pattern and not grad
    original = work.sum(-1, keepdim=True)
    if grad:
        weights = torch.log(work) * inverse_temperature
    else:
        weights = (work.log_() if inplace else torch.log(work)).mul_(inverse_temperature)
    if inverse_temperature > 1.0:  # sharpening: p^(1/T) can underflow, shift each row by its maximum
        peak = weights.amax(-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)  # an all-zero row stays zero
        weights = weights - peak if grad else weights.sub_(peak)
    weights = weights.exp() if grad else weights.exp_()
    total = weights.sum(-1, keepdim=True)
    scale = original / torch.where(total > 0, total, 1.0)
    weights = weights * scale if grad else weights.mul_(scale)
    return weights.to(pattern.dtype)


def _sink_logits(model: Any, layer: int) -> torch.Tensor | None:
    """The learned sink logit of each head of ``layer`` [head], from the wrapped attention module."""
    attn = getattr(model.blocks[layer], "attn", None)
    sinks = getattr(getattr(attn, "original_component", None), "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) and sinks.ndim == 1 else None
