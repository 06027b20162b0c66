"""Attention calibration (ACT; Yu et al., ICML 2024, arXiv 2406.15765).

Per head and input, hidden sinks ``S`` are the keys whose mean received attention over the real
queries that see them exceeds ``tau``; with ``exclude_first`` the first of them is left alone, as
ACT's released code does (``indices = nonzero(alpha > tau)[1:]``: the first index above tau,
normally the initial token, is the sink that is kept). Their columns are scaled by ``beta`` and each
row's freed mass goes to that row's non-sink entries in proportion to their weight, so every row
keeps its sum (1 for plain softmax; ``1 - s_i`` in a learned-sink layer, whose sink share is
unchanged). A row with no non-sink mass is left unchanged (ACT's ``A'_{0,0} = 1``). Post-softmax.
"The real queries that see" a key follow the layer's attention: only those within the window in
a sliding-window layer.

In KV-cached decoding the column means are accumulated over every query seen so far in the
generation, so a decode row uses the sinks of the whole sequence, as the last row of a full
recompute does. The streaming engine runs it in two passes over a layer's query blocks (column
means first, calibration second), which costs a second computation of that layer's scores.
Cached and recomputed generation still differ when a calibrated layer feeds a later one:
recomputing re-calibrates earlier rows as ``S`` changes, which changes the keys and values of later
layers. With only last-layer heads calibrated they agree exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokext.attention.engines.edits import FusedEdit, LayerCall, on_selected_heads
from tokext.errors import InterventionNotAppliedError
from tokext.interventions.base import (
    Hooks,
    Intervention,
    RunContext,
    as_head_pairs,
    check_bool,
    check_number,
    head_index,
    head_selection,
    scale_entries,
    split_row_mass,
)
from tokext.interventions.search import all_heads, default_score, score_each, score_with
from tokext.models.hooks import pattern_hook_name


@dataclass(frozen=True, repr=False)
class SinkCalibration(Intervention):
    """ACT: damp each head's hidden sinks by ``beta`` and hand their mass to the other keys.

    ``heads``: (layer, head) pairs to calibrate (default every head); see
    :func:`select_heads_greedy` for ACT's per-head selection on a calibration set.

    >>> SinkCalibration(beta=0.5, heads=[(3, 1)])
    SinkCalibration(beta=0.5, heads=((3, 1),))
    """

    tau: float = 0.1
    beta: float = 0.4
    heads: tuple[tuple[int, int], ...] | None = None
    exclude_first: bool = True

    def _check(self) -> None:
        check_number("tau", self.tau, low=0.0, high=1.0)
        check_number("beta", self.beta, low=0.0, high=1.0)
        check_bool("exclude_first", self.exclude_first)
        object.__setattr__(self, "heads", as_head_pairs("heads", self.heads))

    def edited_layers(self, model: Any) -> list[int]:
        """Layers whose ``hook_pattern`` this intervention rewrites (validated against ``model``)."""
        return list(head_selection(model, None, self.heads))

    def _make_hooks(self, model: Any, ctx: RunContext) -> Hooks:
        selection = head_selection(model, None, self.heads)
        return [(pattern_hook_name(layer), self._hook(layer, heads, ctx)) for layer, heads in selection.items()]

    def _hook(self, layer: int, heads: list[int] | None, ctx: RunContext) -> Callable:
        name = pattern_hook_name(layer)
        tau, beta, exclude_first = self.tau, self.beta, self.exclude_first
        # received mass and the number of real queries seeing each position, over the sequence so far
        acc: dict[str, torch.Tensor | None] = {"column": None, "count": None}

        def observe(sub: torch.Tensor, pattern: torch.Tensor) -> None:
            """Fold these rows' received mass into the sums (a new call extends those of the cached keys)."""
            batch = pattern.shape[0]
            total = ctx.total(pattern)
            n_call = ctx.block.n_queries if ctx.block is not None else pattern.shape[-2]
            past = total - n_call
            column_sum, count_sum = acc["column"], acc["count"]
            if ctx.block is None or ctx.block.q_start == 0:  # the first rows of a forward pass
                if (
                    past > 0
                    and column_sum is not None
                    and count_sum is not None
                    and column_sum.shape == (batch, sub.shape[1], past)
                ):
                    column_sum = torch.nn.functional.pad(column_sum, (0, n_call))
                    count_sum = torch.nn.functional.pad(count_sum, (0, n_call))
                else:
                    column_sum, count_sum = sub.new_zeros(batch, sub.shape[1], total), sub.new_zeros(batch, total)
                acc["column"], acc["count"] = column_sum, count_sum
            if column_sum is None or count_sum is None:
                raise InterventionNotAppliedError("SinkCalibration saw a later query block before the first one")
            real_q = ctx.real_queries(pattern)
            if real_q is None:
                column = sub.sum(2)  # [batch, head, key]: received mass from the real queries
            else:  # a batched vector-matrix product: no pattern-sized temporary
                column = torch.matmul(real_q[:, None, None, :].to(sub.dtype), sub).squeeze(2)
            keys = ctx.key_positions(pattern)
            column_sum[..., keys] += column
            count_sum[:, keys] += ctx.visible(pattern, layer).sum(1).to(sub.dtype).expand(batch, -1)

        def sinks_of(pattern: torch.Tensor) -> torch.Tensor:
            """Bool [batch, head, key]: the hidden sinks among this pattern's keys."""
            column, count = acc["column"], acc["count"]
            if column is None or count is None:
                raise InterventionNotAppliedError("SinkCalibration has no column sums: nothing was observed")
            received = column / torch.where(count > 0, count, 1.0)[:, None]
            sinks = received > tau  # [batch, head, position]
            real = ctx.sequence_mask(pattern)
            if real is not None:
                sinks &= real[:, None]
            if exclude_first:  # ACT keeps the first position above tau
                sinks.scatter_(2, sinks.to(torch.int8).argmax(2, keepdim=True), False)
            return sinks[..., ctx.key_positions(pattern)]

        def calibrate(pattern: torch.Tensor, hook: Any) -> torch.Tensor | None:
            phase = ctx.block.phase if ctx.block is not None else "both"
            index = head_index(heads, pattern.device)
            sub = pattern if index is None else pattern.index_select(1, index)
            if phase in ("both", "observe"):
                observe(sub, pattern)
            if phase == "observe":
                return None
            owned = index is not None and not (torch.is_grad_enabled() and pattern.requires_grad)
            edited = calibrate_rows(
                sub, sinks_of(pattern)[:, :, None, :], beta, inplace=owned or ctx.inplace_ok(name, pattern)
            )
            if index is None:
                return edited
            if ctx.inplace_ok(name, pattern):
                return pattern.index_copy_(1, index, edited)
            return pattern.index_copy(1, index, edited)

        def fused(call: LayerCall) -> FusedEdit | None:
            """The same edit in the fused streaming kernel: the column means from a first pass (kept as
            a later cached decode step expects them), the hidden sinks as a key mask, the gains per row."""
            if not call.plain:
                return None  # a decode step extends the sums of the cached keys: the pure-torch path

            def mask() -> torch.Tensor:
                like = call.pattern_like
                column = call.first_pass()  # [batch, head, key], over the real queries
                acc["column"] = column if heads is None else column[:, heads]
                acc["count"] = ctx.visible_counts(like, layer).expand(call.batch, -1).to(column.dtype)
                return on_selected_heads(sinks_of(like), heads, call.heads)

            return FusedEdit(key_mask=mask, key_mode="calibrate", key_param=beta)

        # the streaming engine shows it every block twice: first to observe, then to calibrate
        calibrate.stream_two_pass, calibrate.stream_replayable = True, False  # type: ignore[attr-defined]
        calibrate.stream_fused = fused  # type: ignore[attr-defined]
        return calibrate


def calibrate_rows(pattern: torch.Tensor, sinks: torch.Tensor, beta: float, *, inplace: bool) -> torch.Tensor:
    """ACT's row update: sink entries times ``beta``, freed mass spread over the rest by weight.

    ``sinks`` is Bool broadcastable to ``pattern`` [..., query, key].
    """
    sink_mass, rest = split_row_mass(pattern, sinks)
    has_rest = rest > 0
    row_beta = torch.where(has_rest, beta, 1.0).to(pattern.dtype)
    rest_gain = 1.0 + (1.0 - row_beta) * sink_mass / torch.where(has_rest, rest, 1.0)
    return scale_entries(pattern, sinks, row_beta, rest_gain, inplace)


# ---------------------------------------------------------------------- ACT's head selection


@dataclass
class HeadSelection:
    """Result of :func:`select_heads_greedy`: the kept heads and the score of every trial."""

    heads: tuple[tuple[int, int], ...]
    baseline: float
    scores: dict[tuple[int, int], float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def intervention(self) -> SinkCalibration:
        """The :class:`SinkCalibration` of the kept heads, with the selection's tau and beta."""
        if not self.heads:
            from tokext.errors import InputError

            raise InputError("no head improved the score: nothing to calibrate")
        return SinkCalibration(heads=self.heads, **self.settings)


def select_heads_greedy(
    model: Any,
    inputs: Any,
    *,
    candidates: Sequence[tuple[int, int]] | None = None,
    tau: float = 0.1,
    beta: float = 0.4,
    exclude_first: bool = True,
    score: Callable[[Any], float] | None = None,
    min_gain: float = 0.0,
    cumulative: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> HeadSelection:
    """Pick heads for :class:`SinkCalibration` one at a time on a calibration set, as ACT does.

    Each candidate (layer, head) (default: every head) is calibrated alone and kept when it
    lowers ``score`` by more than ``min_gain``. ``score(model) -> float`` (lower is better; it is
    called inside the intervention block) defaults to the mean next-token loss on ``inputs``
    (strings, a token tensor or token lists). ``cumulative=True`` instead tries each candidate on
    top of the heads kept so far (forward greedy selection).
    """
    from tqdm.auto import tqdm

    settings: dict[str, Any] = {"tau": tau, "beta": beta, "exclude_first": exclude_first}
    SinkCalibration(tau=tau, beta=beta, exclude_first=exclude_first)  # validate before any forward pass
    candidates = list(
        as_head_pairs("candidates", candidates if candidates is not None else all_heads(model), allow_none=False)
    )
    head_selection(model, None, candidates)  # validates indices
    score = score if score is not None else default_score(inputs, batch_size)

    def calibrated(heads: list[tuple[int, int]]) -> SinkCalibration:
        return SinkCalibration(heads=tuple(heads), tau=tau, beta=beta, exclude_first=exclude_first)

    baseline = score_with(model, score)
    if not cumulative:  # each head alone against the baseline
        scores = score_each(
            model, score, candidates, lambda pair: calibrated([pair]), progress=progress, desc="ACT head selection"
        )
        alone = [pair for pair in candidates if scores[pair] < baseline - min_gain]
        return HeadSelection(heads=tuple(alone), baseline=baseline, scores=scores, settings=settings)
    kept: list[tuple[int, int]] = []
    scores = {}
    current = baseline
    for pair in tqdm(candidates, desc="ACT head selection", disable=not progress):
        scores[pair] = score_with(model, score, calibrated(kept + [pair]))
        if scores[pair] < current - min_gain:
            kept.append(pair)
            current = scores[pair]
    return HeadSelection(heads=tuple(kept), baseline=baseline, scores=scores, settings=settings)
