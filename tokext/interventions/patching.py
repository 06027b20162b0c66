"""Full early-layer emulation: replace later layers' patterns by a source layer's pattern.

The extreme of :class:`~tokext.interventions.EarlyLayerEmulation`: target heads attend exactly as
the same-index head of ``source_layer`` did in the same forward pass (a KV-cached decode row uses
the source row of the same token, so cached generation equals recomputation).

The source and target layers must see the same keys: copying a full-attention pattern into a
sliding-window layer would attend outside the window (and a window cache does not hold those keys),
so such a pair is refused. In a learned-sink layer the target's sink share becomes the source's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokext.errors import InputError, InterventionNotAppliedError, LayerIndexError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    align_keys,
    as_head_pairs,
    as_int_tuple,
    head_index,
    head_selection,
    is_int,
    model_layout,
)
from tokext.models.hooks import pattern_hook_name, resolve_layers


@dataclass(frozen=True, repr=False)
class PatternPatch(Intervention):
    """Copy ``source_layer``'s pattern into ``target_layers`` (only ``heads`` when given).

    ``heads``: (layer, head) pairs within ``target_layers``; head ``h`` of a target layer gets head
    ``h`` of the source layer.

    >>> PatternPatch(0, (2, 3))
    PatternPatch(source_layer=0, target_layers=(2, 3))
    """

    source_layer: int
    target_layers: tuple[int, ...]
    heads: tuple[tuple[int, int], ...] | None = None

    def _check(self) -> None:
        if not is_int(self.source_layer):
            raise InputError(f"source_layer must be an int, got {self.source_layer!r}")
        object.__setattr__(self, "source_layer", int(self.source_layer))
        object.__setattr__(self, "target_layers", as_int_tuple("target_layers", self.target_layers, allow_none=False))
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))

    def _plan(self, model: Any) -> tuple[int, dict[int, list[int] | None]]:
        source = resolve_layers(model, self.source_layer)[0]
        targets = resolve_layers(model, list(self.target_layers))
        if min(targets) <= source:
            raise LayerIndexError(f"target_layers {targets} must all come after source_layer={source}")
        layout = model_layout(model)
        if layout is not None:
            reach = lambda att: (att.causal, att.window)  # noqa: E731
            differ = [t for t in targets if reach(layout[t]) != reach(layout[source])]
            if differ:
                raise InputError(
                    f"{self!r} on {layout.family}: layer {source} ({layout[source].describe()}) and layers {differ} "
                    f"({', '.join(sorted({layout[t].describe() for t in differ}))}) see different keys, so a copied "
                    "pattern would attend where the target cannot: patch between layers of the same attention kind"
                )
        return source, head_selection(model, targets, self.heads)

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(self._plan(model)[1])

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        source, selection = self._plan(model)
        last = max(selection)
        state: dict[str, Any] = {"pattern": None, "keys": None}

        def record(pattern: torch.Tensor, hook: Any) -> None:
            state["pattern"] = pattern.detach().clone()  # later in-place edits must not reach it
            state["keys"] = ctx.key_positions(pattern)

        record.stream_id = record  # type: ignore[attr-defined]  # a function attribute: what the streaming engine replays

        def make_patch(layer: int, heads: list[int] | None) -> Any:
            name = pattern_hook_name(layer)

            def patch(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
                saved = state["pattern"]
                if layer == last:
                    state["pattern"] = None
                if saved is not None and saved.shape[:-1] == pattern.shape[:-1]:
                    saved = align_keys(saved, state["keys"], ctx.key_positions(pattern))
                if saved is None or saved.shape != pattern.shape:
                    raise InterventionNotAppliedError(
                        f"{self!r}: layer {layer} ran without layer {source}'s pattern of the same forward pass"
                    )
                saved = saved.to(pattern.device, pattern.dtype)  # the source layer may sit on another device
                index = head_index(heads, pattern.device)
                if index is None:
                    return saved if not ctx.inplace_ok(name, pattern) else pattern.copy_(saved)
                if ctx.inplace_ok(name, pattern):
                    return pattern.index_copy_(1, index, saved.index_select(1, index))
                return pattern.index_copy(1, index, saved.index_select(1, index))

            patch.stream_source, patch.stream_recorder = source, record  # type: ignore[attr-defined]
            return patch

        hooks: Hooks = [(pattern_hook_name(source), record)]
        hooks += [(pattern_hook_name(layer), make_patch(layer, heads)) for layer, heads in selection.items()]
        return hooks
