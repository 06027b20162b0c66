"""Head-output ablation: replace head h's output z^h (before the output projection) by 0 or its mean.

z^h_i = sum_j A_ij v_j is what head h hands to the output projection W_O at query i
(``blocks.{l}.attn.hook_z`` [batch, position, head, d_head]). Sandoval-Segura et al. (ICLR 2026)
zero it to test whether a head is inactive; the mean over calibration tokens
(:func:`tokext.calibrate_head_means`) is the more conservative substitute.

How it differs from :class:`~tokext.HeadAblation`, which edits the pattern A:

- ``"zero"``: the same. A zero pattern row gives z = 0 V = 0, so both remove the head's output;
  the output projection's bias (gpt-oss, GPT-2) stays in both.
- ``"mean"``: different. ``HeadAblation(mode="mean")`` attends uniformly over the visible keys, so
  z is the mean value vector *of this sequence's keys*, and still depends on the input;
  ``HeadOutputAblation(mode="mean")`` puts a constant, the mean of z over calibration tokens, in
  its place. A mean pattern is not a mean output.

With the streaming engine the edit is applied to the engine's per-head output (the same tensor),
so both engines give the same numbers; a KV-cached decode step edits its new rows, which is what
recomputing does (the edit does not depend on other positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokext.errors import InputError, LayerIndexError
from tokext.interventions.base import Hooks, Intervention, RunContext, as_head_pairs, check_number
from tokext.models.hooks import resolve_heads
from tokext.models.probes import require_hook_edits

MODES = ("zero", "mean")


def z_hook_name(layer: int) -> str:
    """Name of layer ``layer``'s per-head attention output, before W_O: [batch, position, head, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def d_head(model: Any) -> int:
    """The model's per-head dimension (the width of one head's slice of ``hook_z``)."""
    return int(model.cfg.d_head)


@dataclass(frozen=True, repr=False)
class HeadOutputAblation(Intervention):
    """Replace the outputs z^h of (layer, head) pairs by 0 (``mode="zero"``) or by ``means`` (``"mean"``).

    ``means``: one vector of ``d_head`` numbers per pair, aligned with ``heads``
    (:func:`tokext.calibrate_head_means` computes them). See the module docstring for how this
    differs from :class:`~tokext.HeadAblation`.

    >>> HeadOutputAblation([(0, 1), (2, 3)])
    HeadOutputAblation(heads=((0, 1), (2, 3)))
    """

    heads: tuple[tuple[int, int], ...]
    mode: str = "zero"
    means: tuple[tuple[float, ...], ...] | None = None

    def _check(self) -> None:
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads, allow_none=False))
        if len(set(self.heads)) != len(self.heads):
            raise InputError(f"heads lists a (layer, head) pair twice: {list(self.heads)}")
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}: choose from {list(MODES)}")
        if self.mode == "mean" and self.means is None:
            raise InputError(
                "mode='mean' needs means (one d_head vector per head): pass means=... or compute them "
                "with tokext.calibrate_head_means(model, texts, heads)"
            )
        if self.means is not None:
            try:
                rows = [tuple(row) for row in self.means]
            except TypeError:
                raise InputError("means must be a sequence of vectors, one per (layer, head) pair") from None
            if len(rows) != len(self.heads):
                raise InputError(f"means has {len(rows)} vectors for {len(self.heads)} heads: give one per head")
            for row in rows:
                for v in row:
                    check_number("means", v)
            object.__setattr__(self, "means", tuple(tuple(float(v) for v in row) for row in rows))

    def edited_layers(self, model: Any) -> list[int]:
        """No attention pattern is edited: the edit is on the layer's output."""
        return []

    def _plan(self, model: Any) -> dict[int, list[tuple[int, int]]]:
        """Layer -> [(head, index into heads)], validated against ``model``."""
        resolve_heads(model, self.heads)  # ranges
        if self.means is not None:
            bad = {len(row) for row in self.means} - {d_head(model)}
            if bad:
                raise LayerIndexError(
                    f"{type(self).__name__}: means vectors of length {sorted(bad)}, "
                    f"but heads have d_head={d_head(model)}"
                )
        plan: dict[int, list[tuple[int, int]]] = {}
        for i, (layer, head) in enumerate(self.heads):
            plan.setdefault(layer, []).append((head, i))
        return dict(sorted(plan.items()))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        plan = self._plan(model)
        require_hook_edits(model, "blocks.{layer}.attn.hook_z", list(plan))
        return [(z_hook_name(layer), self._hook(pairs)) for layer, pairs in plan.items()]

    def _hook(self, pairs: list[tuple[int, int]]) -> Any:
        heads = [h for h, _ in pairs]
        rows = None if self.means is None or self.mode == "zero" else [self.means[i] for _, i in pairs]

        def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
            if z.ndim != 4:
                raise InputError(f"hook_z has shape {tuple(z.shape)}, expected [batch, position, head, d_head]")
            index = torch.tensor(heads, device=z.device)
            if rows is None:
                fill = z.new_zeros(len(heads), z.shape[-1])
            else:
                fill = torch.tensor(rows, dtype=z.dtype, device=z.device)
            out = z.clone()
            out[:, :, index] = fill.expand(z.shape[0], z.shape[1], len(heads), z.shape[-1])
            return out

        return ablate
