"""Softmax temperature applied to the post-softmax pattern, exactly.

For a softmax row ``p = softmax(s)`` over the visible keys, ``p^(1/T)`` renormalised equals
``softmax(s / T)``: ``log p = s - logsumexp(s)`` and the constant cancels. Below ``T = 1`` it is
computed in log space (``softmax(log p / T)``), so small temperatures do not underflow; keys with
``p = 0`` (causal and padding zeros) stay 0. Each row keeps its original sum (1 for plain softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokext.hooks import pattern_hook_name
from tokext.interventions.base import (
    Hooks, Intervention, RunContext, as_head_pairs, as_int_tuple, check_number, head_index, head_selection,
    on_heads,
)


@dataclass(frozen=True, repr=False)
class AttentionTemperature(Intervention):
    """Attention softmax temperature ``T``: T > 1 flattens, T < 1 sharpens (pre-softmax equivalent).

    >>> AttentionTemperature(2.0, layers=(1,))
    AttentionTemperature(temperature=2.0, layers=(1,))
    """

    temperature: float
    layers: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None

    def _check(self) -> None:
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))

    def edited_layers(self, model: Any) -> list[int]:
        return list(head_selection(model, self.layers, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        selection = head_selection(model, self.layers, self.heads)
        return [(pattern_hook_name(layer), self._hook(layer, heads, ctx)) for layer, heads in selection.items()]

    def _hook(self, layer: int, heads: list[int] | None, ctx: RunContext) -> Callable:
        name = pattern_hook_name(layer)
        inverse = 1.0 / float(self.temperature)

        def edit(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
            return tempered(sub, inverse, inplace)

        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            return on_heads(pattern, head_index(heads, pattern.device), ctx.inplace_ok(name, pattern), edit)

        return hook


def tempered(pattern: torch.Tensor, inverse_temperature: float, inplace: bool = False) -> torch.Tensor:
    """``pattern^(1/T)`` renormalised to each row's original sum.

    For ``T >= 1`` the power itself is safe (``p^(1/T) >= p``); for ``T < 1`` it is computed in log
    space with each row's maximum subtracted, so rows do not underflow to zero.
    """
    work = pattern if pattern.dtype in (torch.float32, torch.float64) else pattern.float()
    grad = torch.is_grad_enabled() and work.requires_grad  # autograd needs the intermediate tensors
    inplace = inplace and work is pattern and not grad
    original = work.sum(-1, keepdim=True)
    if inverse_temperature <= 1.0:
        weights = work.pow_(inverse_temperature) if inplace else work.pow(inverse_temperature)
    else:
        logits = torch.log(work) * inverse_temperature
        peak = logits.amax(-1, keepdim=True)
        weights = torch.exp(logits - torch.where(torch.isfinite(peak), peak, 0.0))  # exp(-inf) = 0: zeros stay 0
    total = weights.sum(-1, keepdim=True)
    scale = original / torch.where(total > 0, total, 1.0)
    weights = weights * scale if grad else weights.mul_(scale)
    return weights.to(pattern.dtype)
