"""Scale the attention that goes to chosen sink tokens, then renormalise (post-softmax).

``A'_{ij} = w_j A_{ij}`` with ``w_j = scale`` on target keys and 1 elsewhere; with
``renormalize=True`` each row is rescaled to its original sum (1 for plain softmax), which is
PASTA's post-softmax form. A row whose whole mass sits on targets keeps its original values (the
limit as ``scale`` goes to 0). Targets are fixed per row, so KV-cached generation gives the tokens
of recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokext.errors import InputError
from tokext.models.hooks import pattern_hook_name
from tokext.interventions.base import (
    Hooks, Intervention, RunContext, as_head_pairs, as_int_tuple, check_bool, check_number, head_index,
    head_selection, is_int, on_heads, scale_entries, split_row_mass,
)
from tokext.attention.metrics import CATEGORIES

NON_SEMANTIC = ("punctuation", "whitespace")
"""Categories meant by ``targets="categories"``: punctuation/symbols and whitespace/newlines."""


@dataclass(frozen=True, repr=False)
class SinkRebalance(Intervention):
    """Scale attention to sink tokens by ``scale`` and renormalise each row.

    ``targets``:
      - ``"first"``: each row's first real token (BOS when present; position 0 without padding);
      - ``"categories"``: punctuation and whitespace/newline tokens (:data:`NON_SEMANTIC`), or
        any names from :data:`tokext.attention.metrics.CATEGORIES` (a name or a tuple of names);
        the first real token counts as ``"first"``, not by its text, as in the statistics;
      - a tuple of ints: positions counted from each row's first real token.

    >>> SinkRebalance(targets=(0, 1), scale=0.5)
    SinkRebalance(targets=(0, 1), scale=0.5)
    """

    targets: Any = "first"
    scale: float = 0.0
    renormalize: bool = True
    layers: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None

    def _check(self) -> None:
        check_number("scale", self.scale, low=0.0)
        check_bool("renormalize", self.renormalize)
        object.__setattr__(self, "targets", _normalise_targets(self.targets))
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))

    @property
    def needs_tokens(self) -> bool:  # type: ignore[override]
        return any(isinstance(t, str) and t != "first" for t in self._target_names())

    def _target_names(self) -> tuple:
        return (self.targets,) if isinstance(self.targets, str) else self.targets

    def edited_layers(self, model: Any) -> list[int]:
        return list(head_selection(model, self.layers, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        selection = head_selection(model, self.layers, self.heads)
        names = [t for t in self._target_names() if isinstance(t, str)]
        positions = [t for t in self._target_names() if not isinstance(t, str)]
        categories = sorted({CATEGORIES.index(c) for n in names for c in (NON_SEMANTIC if n == "categories" else (n,))})
        table = None
        if any(c != CATEGORIES.index("first") for c in categories):
            from tokext.attention.collect import category_table

            if getattr(model, "tokenizer", None) is None:
                raise InputError(f"{self!r} needs the model's tokenizer to find token categories, and this "
                                 "model has none: target positions or 'first' instead")
            table = category_table(model)
        plan = _TargetPlan(categories=categories, positions=positions, table=table)
        return [(pattern_hook_name(layer), self._hook(layer, heads, ctx, plan)) for layer, heads in selection.items()]

    def _hook(self, layer: int, heads: list[int] | None, ctx: RunContext, plan: "_TargetPlan") -> Callable:
        name = pattern_hook_name(layer)
        scale, renormalize = self.scale, self.renormalize

        def rebalance(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            targets = plan.key_targets(pattern, ctx)[:, None, None, :]  # [batch, 1, 1, key]

            def edit(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
                if not renormalize:
                    return scale_entries(sub, targets, scale, 1.0, inplace)
                return rebalance_rows(sub, targets, scale, inplace=inplace)

            return on_heads(pattern, head_index(heads, pattern.device), ctx.inplace_ok(name, pattern), edit)

        return rebalance


def rebalance_rows(pattern: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor | float, *,
                   inplace: bool) -> torch.Tensor:
    """Entries on ``keys`` times ``scale``, then each row rescaled to its original sum.

    ``keys`` is Bool ``[batch, heads or 1, 1, key]``; ``scale`` a scalar or a per-head tensor
    ``[1, heads, 1, 1]`` (ZeroTuning's factors). With row mass ``t`` on the keys and ``r``
    elsewhere, key entries get ``scale * S / D`` and the others ``S / D``, ``S = t + r``,
    ``D = r + scale * t``: for softmax rows (``S = 1``) this is ``softmax`` with ``log scale``
    added to the keys' scores. A row whose mass is all on the keys and ``scale = 0`` (``D = 0``)
    keeps its original values, the limit as ``scale`` goes to 0.
    """
    on_keys, elsewhere = split_row_mass(pattern, keys)
    total = elsewhere + scale * on_keys
    keep = total <= 0
    ratio = torch.where(keep, 1.0, (on_keys + elsewhere) / torch.where(keep, 1.0, total))
    return scale_entries(pattern, keys, torch.where(keep, 1.0, scale * ratio), ratio, inplace)


@dataclass
class _TargetPlan:
    categories: list[int]
    positions: list[int]
    table: torch.Tensor | None

    def key_targets(self, pattern: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """Bool [batch, key]: which keys are targets."""
        batch, _, _, n_k = pattern.shape
        first = ctx.first_key(pattern)  # [batch]
        key_pos = torch.arange(n_k, device=pattern.device)[None, :]
        offset = key_pos - first[:, None]  # position counted from the row's first real token
        first_id = CATEGORIES.index("first")
        targets = torch.zeros(batch, n_k, dtype=torch.bool, device=pattern.device)
        if first_id in self.categories:
            targets |= ctx.first_key_mask(pattern)
        if self.table is not None:
            category = self.table.to(pattern.device)[ctx.key_tokens(pattern)]
            category = torch.where(offset == 0, first_id, category)
            others = torch.tensor([c for c in self.categories if c != first_id], device=pattern.device)
            targets |= torch.isin(category, others)
        if self.positions:
            targets |= torch.isin(offset, torch.tensor(self.positions, device=pattern.device))
        real = ctx.attention_mask(pattern)
        return targets if real is None else targets & real


def _normalise_targets(targets: Any) -> str | tuple:
    choices = ("first", "categories", *[c for c in CATEGORIES if c != "first"])
    items = [targets] if isinstance(targets, (str, int)) else targets
    try:
        items = list(items)
    except TypeError:
        raise InputError(f"targets must be a name, a tuple of names or a tuple of positions, got {targets!r}") from None
    if not items:
        raise InputError("targets is empty")
    for item in items:
        if isinstance(item, str):
            if item not in choices:
                raise InputError(f"unknown target {item!r}: choose from {list(choices)} or give positions")
        elif not is_int(item) or item < 0:
            raise InputError(f"target positions must be non-negative ints (from each row's first real "
                             f"token), got {item!r}")
    if isinstance(targets, str):
        return targets
    return tuple(item if isinstance(item, str) else int(item) for item in items)
