"""Head ablation through the attention pattern (so it acts before the values are mixed).

- ``"zero"``: the head attends nowhere (pattern row 0), so its output ``z = A V`` is 0;
- ``"mean"``: uniform attention over the keys the query can see (its window, in a sliding-window
  layer), so ``z`` is the mean value vector of those keys;
- ``"first"``: all attention on the row's first real token (a dormant, sink-only head); a row
  whose window no longer reaches that token attends nowhere.

In a learned-sink layer (gpt-oss) the row replaces the whole distribution: ``"zero"`` hands the
sink everything (share 1), ``"mean"`` and ``"first"`` leave it nothing (share 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokext.errors import InputError
from tokext.interventions.base import Hooks, Intervention, RunContext, as_head_pairs, head_index, head_selection
from tokext.models.hooks import pattern_hook_name

MODES = ("zero", "mean", "first")


@dataclass(frozen=True, repr=False)
class HeadAblation(Intervention):
    """Ablate (layer, head) pairs: ``mode`` is ``"zero"``, ``"mean"`` or ``"first"`` (see module doc).

    >>> HeadAblation([(0, 1)], mode="mean")
    HeadAblation(heads=((0, 1),), mode='mean')
    """

    heads: tuple[tuple[int, int], ...]
    mode: str = "zero"

    def _check(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown ablation mode {self.mode!r}: choose from {list(MODES)}")
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads, allow_none=False))

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(head_selection(model, None, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        selection = head_selection(model, None, self.heads)
        return [(pattern_hook_name(layer), self._hook(layer, heads, ctx)) for layer, heads in selection.items()]

    def _hook(self, layer: int, heads: list[int] | None, ctx: RunContext) -> Callable:
        name, mode = pattern_hook_name(layer), self.mode

        def ablate(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            batch, n_heads, n_q, n_k = pattern.shape
            index = head_index(heads, pattern.device)
            width = n_heads if index is None else int(index.numel())
            if mode == "zero":
                replacement = pattern.new_zeros(batch, width, n_q, n_k)
            elif mode == "mean":
                visible = ctx.visible(pattern, layer).to(pattern.dtype)  # [batch or 1, query, key]
                rows = visible / visible.sum(-1, keepdim=True).clamp_min(1.0)
                replacement = rows[:, None].expand(batch, width, n_q, n_k)
            else:
                first = ctx.key_offsets(pattern) == 0  # [batch, key]: the row's first real token
                rows = (first[:, None, :] & ctx.visible(pattern, layer)).to(pattern.dtype)
                replacement = rows[:, None].expand(batch, width, n_q, n_k)
            inplace = ctx.inplace_ok(name, pattern)
            if index is None:
                return pattern.copy_(replacement) if inplace else replacement.contiguous()
            replacement = replacement.contiguous()
            return pattern.index_copy_(1, index, replacement) if inplace else pattern.index_copy(1, index, replacement)

        return ablate
