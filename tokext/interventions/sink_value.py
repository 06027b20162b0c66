"""The sink's value contribution removed from the other tokens: the no-op test of a sink.

Gu et al. (2024) and Kobayashi et al. (2020) argue that a sink holds attention but adds little:
its value vector is small, so ``A_i0 v_0`` is a near-zero term of every head output
``z_i = sum_j A_ij v_j``. :class:`SinkValueRemoval` removes that term: it sets ``A_i0 = 0`` for every
query row except the first token's own, without renormalising, so each other row keeps the
attention it gave to the rest of the sequence unchanged. This is setting ``v_0 = 0`` as the other
tokens read it (z is linear in the values and no other entry moves) while the first token's own
row, which sees only itself, keeps its output: zeroing ``v_0`` outright (or ``A_00``) would also
change the first token's residual stream, and so the sink's keys and values in every later layer.
Compare :class:`~tokext.SinkRebalance`, which renormalises: the attention the sink held then goes
to the other tokens.

"First token" is each row's first real token (left padding). The edit is per row and per key, so a
KV-cached decode step gives what a recompute gives, and the streaming engine edits each block alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokext.interventions.base import Hooks, Intervention, RunContext, as_int_tuple
from tokext.models.hooks import pattern_hook_name, resolve_layers


@dataclass(frozen=True, repr=False)
class SinkValueRemoval(Intervention):
    """Remove the first token's value contribution from every later query (``A_i0 = 0`` for ``i > 0``,
    no renormalisation) in ``layers`` (default: all). See the module docstring.

    >>> SinkValueRemoval(layers=(3, 4))
    SinkValueRemoval(layers=(3, 4))
    """

    layers: tuple[int, ...] | None = None

    def _check(self) -> None:
        object.__setattr__(self, "layers", as_int_tuple("layers", self.layers))

    def edited_layers(self, model: Any) -> list[int]:
        """The layers whose patterns lose the first token's value contribution (default: every layer)."""
        return resolve_layers(model, None if self.layers is None else list(self.layers))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        def remove(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            first_key = ctx.first_key_mask(pattern)  # [batch, key]
            own_row = (ctx.query_positions(pattern)[None, :] - ctx.first_position(pattern)[:, None]) == 0
            drop = first_key[:, None, None, :] & ~own_row[:, None, :, None]  # [batch, 1, query, key]
            return pattern.masked_fill(drop, 0.0)

        return [(pattern_hook_name(layer), remove) for layer in self.edited_layers(model)]
