"""Interventions' edits in the form the fused streaming kernel applies them, row by row, in cache.

Why. An intervention's stage is a Python function of a ``[batch, head, rows, keys]`` block, which the
C++ kernel (``csrc/fused_attention.cpp``) cannot call while a row sits in its cache. So a stage may
also describe its edit of a whole layer call in a few primitives the kernel implements, and the
streaming engine then runs that layer in the kernel instead of the pure-torch blocks:

- a score affine per head, ``s * score_scale[h] + score_shift[h]`` on the visible scores (a softmax
  temperature, with a learned sink's shift);
- key-set gains: a 0/1 key mask ``[batch, head, key]`` and one of three rules that turn each row's
  mass on (``t``) and off (``r``) the masked keys into a gain on them and one elsewhere:
  ``"rebalance"`` (the keys times ``key_param``, the row kept at its sum, a learned sink's share
  weighted by ``sink_scale``), ``"scale"`` (the keys times ``key_param``) and ``"calibrate"`` (ACT:
  the keys times ``key_param`` = beta, the freed mass to the rest in proportion);
- sparse boosts: the keys that a source layer's row attends to above a threshold, recorded by the
  kernel in that layer's call (``record``), multiplied by ``boost_gain[h]`` in a later layer's same
  row, optionally renormalised (early-layer emulation). Above a threshold ``tau`` a softmax row has
  fewer than ``1 / tau`` such keys, so the record is a short list per row, not a ``[T, T]`` mask.

A stage's hook function carries the description as ``fn.stream_fused(call) -> FusedEdit | None``
(None: this call cannot be fused, the pure-torch blocks run it); :class:`LayerCall` tells it the
call's shape and gives it a whole-layer stand-in for the shape arguments of
:class:`~tokext.interventions.base.RunContext`. The edits are the same arithmetic as the stage
functions (tested against them on every family of the conformance matrix, to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

KEY_MODES = {"rebalance": 1, "scale": 2, "calibrate": 3}
"""The kernel's codes of the key-set gain rules (``kKeys*`` in ``fused_attention.cpp``)."""


@dataclass
class FusedEdit:
    """One stage's edit of a whole layer call, as the fused kernel applies it (fields: see the module).

    ``key_mask`` may be a function that computes the mask when the kernel is about to run (ACT's
    mask needs a first pass over the layer); ``boost_source`` is ``(layer, recorder)``: the source
    layer and the record stage's function whose record the boost reads."""

    score_scale: torch.Tensor | None = None
    score_shift: torch.Tensor | None = None
    key_mask: torch.Tensor | Callable[[], torch.Tensor] | None = None
    key_mode: str | None = None
    key_param: float = 1.0
    sink_scale: float = 1.0
    boost_gain: torch.Tensor | None = None
    boost_source: tuple[int, Any] | None = None
    boost_renormalize: bool = False
    record: tuple[float, bool] | None = None  # (threshold, exclude_self)

    @property
    def edits_scores(self) -> bool:
        """Whether it changes the scores before the softmax (and nothing after it)."""
        return self.score_scale is not None or self.score_shift is not None

    @property
    def edits_pattern(self) -> bool:
        """Whether it changes the probabilities after the softmax."""
        return self.key_mode is not None or self.boost_source is not None


@dataclass
class LayerCall:
    """One layer's attention call as a fused stage description sees it.

    ``first_pass()``: the column sums ``[batch, head, key]`` of the unedited probabilities over the
    real query rows (computed once, by the kernel, on demand: ACT's column means)."""

    layer: int
    batch: int
    heads: int
    n_queries: int
    n_keys: int
    device: torch.device
    first_pass: Callable[[], torch.Tensor]

    @property
    def pattern_like(self) -> torch.Tensor:
        """A ``[batch, head, query, key]`` stand-in that holds no memory (an expanded scalar), for the
        shape and device arguments of the run context's helpers."""
        return torch.zeros((), device=self.device).expand(self.batch, self.heads, self.n_queries, self.n_keys)

    @property
    def plain(self) -> bool:
        """Whether the call has no KV cache (the queries are all the keys): what the sparse records
        and ACT's column means assume."""
        return self.n_queries == self.n_keys


def head_vector(heads: list[int] | None, n_heads: int, selected: float, other: float) -> torch.Tensor:
    """``[n_heads]`` float32: ``selected`` on ``heads`` (every head when None), ``other`` elsewhere."""
    if heads is None:
        return torch.full((n_heads,), float(selected))
    vector = torch.full((n_heads,), float(other))
    vector[torch.as_tensor(heads, dtype=torch.long)] = float(selected)
    return vector


def on_selected_heads(mask: torch.Tensor, heads: list[int] | None, n_heads: int) -> torch.Tensor:
    """A key mask ``[batch, heads or 1 or len(heads), key]`` as ``[batch, n_heads, key]`` float32,
    zero on the heads not in ``heads`` (every head when None)."""
    mask = mask.to(torch.float32)
    if heads is None:
        return mask.expand(mask.shape[0], n_heads, mask.shape[-1]).contiguous()
    full = torch.zeros(mask.shape[0], n_heads, mask.shape[-1], device=mask.device)
    full[:, torch.as_tensor(heads, dtype=torch.long, device=mask.device)] = mask
    return full
