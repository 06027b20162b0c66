"""Edits of the residual stream: a block's output, the hidden state the next block reads.

- :class:`ResidualPatch`: set chosen (position, dim) entries of block ``layer``'s output to a value;
- :class:`MassiveActivationAblation`: set the massive activations of chosen dims (Sun et al. 2024's
  criterion, :func:`tokext.attention.residual.massive_mask`) to zero or to their mean, as in their
  exp3 (the published perplexity rows: GPT-2 30.42 -> 30.57 -> 30.42, LLaMA2-7B 5.13 -> 8977 -> 5.14).

Both act on ``blocks.{layer}.hook_resid_post`` [batch, position, d_model] (TransformerLens's name
for the decoder layer's output), a hook that fires with either attention engine, so the hook and
the streaming engine give the same numbers. Neither touches the attention pattern.

Positions count from each row's first real token (a left-padded row's "position 0" is its first
real token, as everywhere in tokext). With a KV cache a call's queries are the last positions of
the sequence so far, and an edit applies to the positions among them: cached generation equals
recomputing the sequence (ResidualPatch always; MassiveActivationAblation when no earlier entry
crosses the threshold as the sequence median moves, see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokext.attention.residual import ABS_THRESHOLD, RATIO, massive_mask, median_abs
from tokext.errors import InputError, LayerIndexError
from tokext.interventions.base import Hooks, Intervention, RunContext, as_int_tuple, check_number, is_int
from tokext.models.hooks import resolve_layers

MODES = ("zero", "mean")


def resid_hook_name(layer: int) -> str:
    """Name of block ``layer``'s output hook: [batch, position, d_model]."""
    return f"blocks.{layer}.hook_resid_post"


def _int_tuple(name: str, value: Any, *, low: int = 0) -> tuple[int, ...]:
    """:func:`~tokext.interventions.base.as_int_tuple`, required, each at least ``low``, none twice."""
    items = as_int_tuple(name, value, allow_none=False) or ()
    bad = [x for x in items if x < low]
    if bad:
        raise InputError(f"{name} must be >= {low}, got {bad}")
    if len(set(items)) != len(items):
        raise InputError(f"{name} lists an entry twice: {list(items)}")
    return items


def _layer(model: Any, layer: int) -> int:
    return resolve_layers(model, int(layer))[0]


def check_dims(model: Any, dims: tuple[int, ...], owner: str) -> None:
    """Raise :class:`LayerIndexError` for dims outside the model's hidden size."""
    d_model = int(model.cfg.d_model)
    bad = [d for d in dims if d >= d_model]
    if bad:
        raise LayerIndexError(f"{owner}: dims {bad} outside the hidden size {d_model} (0..{d_model - 1})")


def _row_offsets(ctx: RunContext, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Long [batch, query]: each query's position counted from its row's first real token, and Bool
    [batch, query] real queries (``None``: all)."""
    batch, n_q = h.shape[0], h.shape[1]
    mask = ctx.inputs.attention_mask
    if mask is None:
        past = int(ctx.inputs.past_len)
        pos = torch.arange(past, past + n_q, device=h.device)[None].expand(batch, n_q)
        return pos, None
    mask = mask.to(h.device, torch.bool)
    if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] < n_q:
        raise InputError(
            f"attention_mask of shape {tuple(mask.shape)} does not match the hidden state {tuple(h.shape)}"
        )
    total = mask.shape[1]
    first = mask.to(torch.int8).argmax(1)
    pos = torch.arange(total - n_q, total, device=h.device)[None] - first[:, None]
    return pos, mask[:, total - n_q :]


@dataclass(frozen=True, repr=False)
class ResidualPatch(Intervention):
    """Set block ``layer``'s output at ``positions`` and ``dims`` to ``value`` (a scalar or one per dim).

    Positions count from each row's first real token; a row shorter than a position is left alone,
    and in a cached decode step only the new positions are edited (module docstring).

    >>> ResidualPatch(2, positions=0, dims=(5, 7))
    ResidualPatch(layer=2, positions=(0,), dims=(5, 7))
    """

    layer: int
    positions: tuple[int, ...]
    dims: tuple[int, ...]
    value: float | tuple[float, ...] = 0.0

    def _check(self) -> None:
        if not is_int(self.layer):
            raise InputError(f"layer must be an int, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "positions", _int_tuple("positions", self.positions))
        object.__setattr__(self, "dims", _int_tuple("dims", self.dims))
        value = self.value
        if isinstance(value, (list, tuple)):
            for v in value:
                check_number("value", v)
            if len(value) != len(self.dims):
                raise InputError(f"value has {len(value)} entries for {len(self.dims)} dims: give one per dim")
            object.__setattr__(self, "value", tuple(float(v) for v in value))
        else:
            check_number("value", value)
            object.__setattr__(self, "value", float(value))

    def edited_layers(self, model: Any) -> list[int]:
        """No attention pattern is edited: the edit is on the layer's output."""
        return []

    def check_inputs(self, model: Any, lengths: list[int]) -> None:
        """Raise :class:`InputError` when a position lies beyond every sequence (nothing would change)."""
        longest = max(lengths)
        bad = [p for p in self.positions if p >= longest]
        if bad:
            raise InputError(f"{self!r}: positions {bad} beyond the sequences (the longest has {longest} tokens)")

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        layer = _layer(model, self.layer)
        check_dims(model, self.dims, repr(self))
        name = resid_hook_name(layer)

        def patch(h: torch.Tensor, hook: Any) -> torch.Tensor:
            pos, real = _row_offsets(ctx, h)
            wanted = torch.tensor(self.positions, device=h.device)
            rows = (pos[..., None] == wanted).any(-1)  # [batch, query]
            if real is not None:
                rows &= real
            dims = torch.tensor(self.dims, device=h.device)
            value = torch.as_tensor(self.value, dtype=h.dtype, device=h.device)
            out = h.clone()
            picked = out[:, :, dims]  # [batch, query, n_dims]
            out[:, :, dims] = torch.where(rows[..., None], value.expand_as(picked), picked)
            return out

        return [(name, patch)]


@dataclass(frozen=True, repr=False)
class MassiveActivationAblation(Intervention):
    """Set the massive activations of ``dims`` at block ``layer``'s output to 0 or to their mean.

    In each sequence, an entry of a dim in ``dims`` is massive when ``|h| > abs_threshold`` and
    ``|h| >= ratio x`` the sequence's median ``|h|`` at that layer (over real positions and every
    dim: :func:`tokext.attention.residual.massive_mask`). ``mode="zero"`` sets it to 0;
    ``mode="mean"`` sets it to ``means[i]`` for ``dims[i]`` (Sun et al.'s mean over many sequences:
    :func:`tokext.calibrate_massive_ablation` finds the layer, dims and means).

    Under a KV cache the median is that of the sequence so far (the cached positions' outputs are
    kept for the run) and only the new positions are edited; recomputing the sequence re-decides
    the earlier positions with the longer sequence's median, so the two agree exactly unless an
    earlier entry crosses the threshold as the median moves (massive activations sit orders of
    magnitude above it).

    >>> MassiveActivationAblation(2, dims=(447,))
    MassiveActivationAblation(layer=2, dims=(447,))
    """

    layer: int
    dims: tuple[int, ...]
    mode: str = "zero"
    means: tuple[float, ...] | None = None
    abs_threshold: float = ABS_THRESHOLD
    ratio: float = RATIO

    def _check(self) -> None:
        if not is_int(self.layer):
            raise InputError(f"layer must be an int, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "dims", _int_tuple("dims", self.dims))
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}: choose from {list(MODES)}")
        check_number("abs_threshold", self.abs_threshold, low=0.0)
        check_number("ratio", self.ratio, low=0.0)
        object.__setattr__(self, "abs_threshold", float(self.abs_threshold))
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.mode == "mean" and self.means is None:
            raise InputError(
                "mode='mean' needs means (one per dim): pass means=... or build it with "
                "tokext.calibrate_massive_ablation(model, texts, 'mean')"
            )
        if self.means is not None:
            if not isinstance(self.means, (list, tuple)):
                raise InputError(f"means must be a sequence of numbers (one per dim), got {self.means!r}")
            for v in self.means:
                check_number("means", v)
            if len(self.means) != len(self.dims):
                raise InputError(f"means has {len(self.means)} entries for {len(self.dims)} dims: give one per dim")
            object.__setattr__(self, "means", tuple(float(v) for v in self.means))

    def edited_layers(self, model: Any) -> list[int]:
        """No attention pattern is edited: the edit is on the layer's output."""
        return []

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        layer = _layer(model, self.layer)
        check_dims(model, self.dims, repr(self))
        name = resid_hook_name(layer)
        state: dict[str, Any] = {"h": None, "real": None}

        def ablate(h: torch.Tensor, hook: Any) -> torch.Tensor:
            _, real = _row_offsets(ctx, h)
            seen, seen_real = _so_far(state, ctx, h, real)
            median = median_abs(seen, seen_real)
            mask = massive_mask(h, real, self.abs_threshold, self.ratio, median=median)
            dims = torch.tensor(self.dims, device=h.device)
            mask = mask[:, :, dims]
            out = h.clone()
            picked = out[:, :, dims]
            if self.mode == "zero":
                fill = torch.zeros((), dtype=h.dtype, device=h.device)
            else:
                fill = torch.tensor(self.means, dtype=h.dtype, device=h.device)
            out[:, :, dims] = torch.where(mask, fill.expand_as(picked), picked)
            return out

        return [(name, ablate)]


def _so_far(
    state: dict[str, Any], ctx: RunContext, h: torch.Tensor, real: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's outputs of the whole sequence so far (cached calls: the kept earlier outputs, then
    these), with their real-position mask; kept for the next cached call."""
    past = int(ctx.inputs.past_len)
    kept = state["h"]
    if past == 0 or kept is None or kept.shape[0] != h.shape[0] or kept.shape[1] != past:
        if past:
            raise InputError(
                "MassiveActivationAblation needs the outputs of the cached positions: start the cached "
                "generation (its prefill) inside the same `tokext.intervene` block"
            )
        seen, seen_real = h.detach(), real
    else:
        seen = torch.cat([kept, h.detach()], dim=1)
        mask = ctx.inputs.attention_mask
        seen_real = None if mask is None else mask.to(h.device, torch.bool)
    state["h"], state["real"] = seen, seen_real
    return seen, seen_real
