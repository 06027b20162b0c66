"""Scale the attention that goes to chosen sink tokens, then renormalise (post-softmax).

``A'_{ij} = w_j A_{ij}`` with ``w_j = scale`` on target keys and 1 elsewhere; with
``renormalize=True`` each row is rescaled to its original sum (1 for plain softmax), which is
PASTA's post-softmax form. A row whose whole mass sits on targets keeps its original values (the
limit as ``scale`` goes to 0). Targets are fixed per row, so KV-cached generation gives the tokens
of recomputation.

Learned sinks (gpt-oss): a row's distribution is its keys plus the sink, whose share is
``s_i = 1 - sum_j A_ij``. Renormalising keeps the whole distribution's total, so the sink keeps its
share unless it is a target itself (``"sink"``): then ``w_sink = scale`` too, and the keys gain
what the sink gives up (or the reverse for ``scale > 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokext.attention.engines.edits import FusedEdit, LayerCall, on_selected_heads
from tokext.attention.metrics import CATEGORIES
from tokext.errors import InputError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    as_head_pairs,
    as_int_tuple,
    check_bool,
    check_number,
    head_index,
    head_selection,
    in_float64,
    is_int,
    learned_sink_share,
    model_layout,
    on_heads,
    scale_entries,
    split_row_mass,
)
from tokext.models.hooks import pattern_hook_name

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
      - ``"sink"``: the learned sink logit's share of each row (models with one, e.g. gpt-oss;
        needs ``renormalize=True``: the sink has no value vector, only its share can move);
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
        """Whether a target names a token class, so the token ids must be known."""
        return any(isinstance(t, str) and t not in ("first", "sink") for t in self._target_names())

    def _target_names(self) -> tuple:
        return (self.targets,) if isinstance(self.targets, str) else self.targets

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(head_selection(model, self.layers, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        selection = head_selection(model, self.layers, self.heads)
        names = [t for t in self._target_names() if isinstance(t, str) and t != "sink"]
        positions = [t for t in self._target_names() if not isinstance(t, str)]
        scale_sink = "sink" in self._target_names()
        if scale_sink:
            self._check_sink_target(model, list(selection))
        categories = sorted({CATEGORIES.index(c) for n in names for c in (NON_SEMANTIC if n == "categories" else (n,))})
        table = None
        if any(c != CATEGORIES.index("first") for c in categories):
            from tokext.attention.collect import category_table

            if getattr(model, "tokenizer", None) is None:
                raise InputError(
                    f"{self!r} needs the model's tokenizer to find token categories, and this "
                    "model has none: target positions or 'first' instead"
                )
            table = category_table(model)
        plan = _TargetPlan(categories=categories, positions=positions, table=table)
        return [
            (pattern_hook_name(layer), self._hook(layer, heads, ctx, plan, scale_sink))
            for layer, heads in selection.items()
        ]

    def _check_sink_target(self, model: Any, layers: list[int]) -> None:
        """Refuse the ``"sink"`` target where there is no learned sink, or nothing to renormalise."""
        layout = model_layout(model)
        if not self.renormalize:
            raise InputError(
                f"{self!r}: the learned sink has no value vector, so scaling its share changes "
                "nothing unless rows are renormalised: use renormalize=True"
            )
        without = [layer for layer in layers if layout is None or not layout[layer].learned_sink]
        if without:
            family = layout.family if layout is not None else "this model"
            raise InputError(
                f"{self!r}: {family} has no learned sink logit in layers {without}; the 'sink' "
                "target exists only where one joins the softmax (gpt-oss)"
            )

    def _hook(
        self, layer: int, heads: list[int] | None, ctx: RunContext, plan: _TargetPlan, scale_sink: bool
    ) -> Callable:
        name = pattern_hook_name(layer)
        scale, renormalize = self.scale, self.renormalize
        learned = ctx.attention(layer).learned_sink
        sink_weight = scale if scale_sink else 1.0

        def rebalance(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            targets = plan.key_targets(pattern, ctx)[:, None, None, :]  # [batch, 1, 1, key]

            def edit(sub: torch.Tensor, inplace: bool) -> torch.Tensor:
                if not renormalize:
                    return scale_entries(sub, targets, scale, 1.0, inplace)
                return rebalance_rows(
                    sub, targets, scale, inplace=inplace, learned_sink=learned, sink_scale=sink_weight
                )

            return on_heads(
                pattern,
                head_index(heads, pattern.device),
                ctx.inplace_ok(name, pattern),
                in_float64(edit) if learned else edit,
            )

        def fused(call: LayerCall) -> FusedEdit | None:
            """The same edit in the fused streaming kernel: the targets as a key mask, the gains per row."""
            if scale_sink and heads is not None:
                return None  # the sink's weight would reach the heads left alone
            targets = plan.key_targets(call.pattern_like, ctx)[:, None, :]  # [batch, 1, key]
            return FusedEdit(
                key_mask=on_selected_heads(targets, heads, call.heads),
                key_mode="rebalance" if renormalize else "scale",
                key_param=scale,
                sink_scale=sink_weight if learned else 1.0,
            )

        rebalance.stream_fused = fused  # type: ignore[attr-defined]
        return rebalance


def rebalance_rows(
    pattern: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    inplace: bool,
    learned_sink: bool = False,
    sink_scale: float = 1.0,
) -> torch.Tensor:
    """Entries on ``keys`` times ``scale``, then each row rescaled to its original sum.

    ``keys`` is Bool ``[batch, heads or 1, 1, key]``; ``scale`` a scalar or a per-head tensor
    ``[1, heads, 1, 1]`` (ZeroTuning's factors). With row mass ``t`` on the keys and ``r``
    elsewhere, key entries get ``scale * S / D`` and the others ``S / D``, ``S = t + r``,
    ``D = r + scale * t``: for softmax rows (``S = 1``) this is ``softmax`` with ``log scale``
    added to the keys' scores. A row whose mass is all on the keys and ``scale = 0`` (``D = 0``)
    keeps its original values, the limit as ``scale`` goes to 0.

    ``learned_sink``: the layer's softmax has a learned sink logit whose share ``s = 1 - S`` is one
    more entry of the row, weighted by ``sink_scale``: ``S = t + r + s``, ``D = r + scale * t +
    sink_scale * s``, still ``softmax`` with the logits moved (call it in float64, see
    :func:`~tokext.interventions.base.learned_sink_share`).
    """
    on_keys, elsewhere = split_row_mass(pattern, keys)
    sink = learned_sink_share(pattern) if learned_sink else 0.0
    total = elsewhere + scale * on_keys + sink_scale * sink
    keep = total <= 0
    ratio = torch.where(keep, 1.0, (on_keys + elsewhere + sink) / torch.where(keep, 1.0, total))
    return scale_entries(pattern, keys, torch.where(keep, 1.0, scale * ratio), ratio, inplace)


@dataclass
class _TargetPlan:
    categories: list[int]
    positions: list[int]
    table: torch.Tensor | None

    def key_targets(self, pattern: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """Bool [batch, key]: which keys are targets."""
        batch, _, _, n_k = pattern.shape
        offset = ctx.key_offsets(pattern)  # [batch, key]: position counted from the row's first real token
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
    choices = ("first", "categories", "sink", *[c for c in CATEGORIES if c != "first"])
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
            raise InputError(
                f"target positions must be non-negative ints (from each row's first real token), got {item!r}"
            )
    if isinstance(targets, str):
        return targets
    return tuple(item if isinstance(item, str) else int(item) for item in items)
