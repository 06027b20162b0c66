"""Streaming attention statistics: O(layers x heads x positions) accumulators fed inside hooks.

:class:`AttentionStats` is filled by :func:`tokext.collect_attention_stats`. Each ``hook_pattern``
call is folded into running sums (:meth:`AttentionStats.update`) and the pattern is dropped, so
memory never grows with sequences x positions^2. Stats are mergeable, saved as one ``.npz`` file,
and carry the metadata that made them (model, T, BOS handling, inputs, each layer's attention).

Conventions (the formulas live in :mod:`tokext.attention.metrics`):
- what a query sees is its layer's :class:`~tokext.models.architectures.LayerAttention` (causal,
  sliding window, bidirectional), so every divisor below counts only what the model lets it see;
- ``received`` [layer, head, key]: alpha_k per sequence (mean over the real queries that see k),
  then averaged over the sequences that have a position k;
- ``entropy`` [layer, head]: normalised row entropy pooled over every real query row with at
  least two outcomes (visible keys, plus the sink in a learned-sink layer);
- ``category_mass`` [layer, head, category]: mean share of a real row's mass on each category;
- ``learned_sink_mass`` [layer, head]: mean share of the learned sink (``1 - sum_j p_ij``, gpt-oss);
- rows are renormalised over their visible keys before any of these (a learned-sink row over keys
  plus sink, as the model uses it); ``row_sum`` keeps the raw sum;
- ``by_position`` (when collected with position bins): first-token mass and entropy per bin of
  query positions (:class:`~tokext.attention.positions.PositionProfile`);
- ``norms`` (when collected with ``norms=True``): key, value, head-output and residual norms,
  norm-weighted received attention and massive activations (:class:`~tokext.attention.norms.NormStats`,
  shown through :class:`~tokext.attention.norm_results.NormResults`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokext.attention import metrics
from tokext.attention.masks import CAUSAL, first_real_position, visibility_counts
from tokext.attention.metrics import CATEGORIES
from tokext.attention.norm_results import NormResults
from tokext.attention.norms import NormStats
from tokext.attention.positions import PositionProfile
from tokext.errors import DataFileError, InputError
from tokext.models.architectures import LayerAttention

_EVENT_FIELDS = ("sequence", "layer", "head", "position", "token_id", "alpha")
_CHUNK_ELEMENTS = 1 << 22  # temporaries of at most 16 MiB (fp32) while reducing a pattern
_MIN_BLOCK_ROWS = 32  # query rows per block of the entropy reduction
FORMAT = "tokext-attention-stats-3"  # 3: optional norm arrays (norm_*, residual_*)
PER_SEQUENCE_POSITIONS = 4  # alpha_k of each sequence is kept for these first positions (StreamingLLM's 4)


def _sum_plogp(
    p: torch.Tensor, attention: LayerAttention = CAUSAL, query_start: int | None = None, key_start: int = 0
) -> torch.Tensor:
    """sum_k p log p over the key axis [batch, head, query], in query blocks.

    A causal pattern is zero above the diagonal (and, in a window, below it), so a block of queries
    only reads the keys its rows can see: the logarithm runs over about half the pattern (a sliver
    of it for a window), and the temporary stays small. Bidirectional rows read every key. Row ``r``
    is at position ``query_start + r`` and column ``c`` at ``key_start + c`` (default: the rows are
    the last positions of the key axis).
    """
    batch, heads, queries, keys = p.shape
    budget = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * keys))
    rows = min(budget, max(_MIN_BLOCK_ROWS, -(-queries // 8)))
    out = torch.empty(p.shape[:-1], dtype=p.dtype, device=p.device)
    offset = (keys - queries) if query_start is None else query_start - key_start  # column of row 0's position
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        lo, hi = 0, keys
        if attention.causal:
            hi = max(0, min(keys, offset + stop))
            if attention.window is not None:
                lo = min(hi, max(0, offset + start - attention.window + 1))
        block = p[:, :, start:stop, lo:hi]
        out[:, :, start:stop] = torch.special.xlogy(block, block).sum(-1)
    return out


@dataclass
class BatchContext:
    """What the hooks need to know about the batch in flight (set by the collector per batch).

    The counts of visible keys and queries depend on the layer's attention kind; they are computed
    once per batch for each kind that asks (:meth:`counts`).
    """

    real: torch.Tensor  # Bool [batch, pos]
    categories: torch.Tensor  # Long [batch, pos]
    tokens: torch.Tensor  # Long [batch, pos]
    sequence_ids: torch.Tensor  # Long [batch]
    last: torch.Tensor | None = None  # Long [batch]: each row's last real token
    _counts: dict = field(default_factory=dict, repr=False)
    _first: torch.Tensor | None = field(default=None, repr=False)

    @property
    def first(self) -> torch.Tensor:
        """Long [batch]: each row's first real token (its BOS or [CLS] when present)."""
        if self._first is None:
            self._first = first_real_position(self.real)
        return self._first

    def counts(self, attention: LayerAttention = CAUSAL) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n_queries [batch, key], n_keys [batch, query])`` for a layer of this kind (floats)."""
        kind = (attention.causal, attention.window)
        if kind not in self._counts:
            self._counts[kind] = visibility_counts(self.real, attention)
        return self._counts[kind]

    @property
    def n_queries(self) -> torch.Tensor:
        """Real queries that see each key under causal attention [batch, key]."""
        return self.counts()[0]

    @property
    def n_keys(self) -> torch.Tensor:
        """Visible keys of each real query under causal attention [batch, query]."""
        return self.counts()[1]


def _filled(array: np.ndarray | None) -> np.ndarray:
    """``array`` of collected statistics; an error when nothing was collected."""
    if array is None:
        raise InputError("these statistics are empty: collect them first")
    return array


@dataclass(frozen=True)
class _Sums:
    """The sums every finished collection holds (checked present once, for merge and save)."""

    received: np.ndarray
    count: np.ndarray
    entropy: np.ndarray
    mass: np.ndarray
    row_sum: np.ndarray

    @classmethod
    def of(cls, stats: AttentionStats) -> _Sums:
        return cls(
            _filled(stats.received_sum),
            _filled(stats.received_count),
            _filled(stats.entropy_sum),
            _filled(stats.mass_sum),
            _filled(stats.row_sum_sum),
        )


@dataclass
class AttentionStats(NormResults):
    """Per-layer, per-head attention statistics accumulated over a dataset (see module docstring)."""

    layers: list[int]
    n_heads: int
    metadata: dict[str, Any] = field(default_factory=dict)
    sink_floor: float = 0.05
    received_sum: np.ndarray | None = None
    received_count: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    entropy_rows: np.ndarray | int = 0  # [layer]: rows counted in each layer's entropy
    mass_sum: np.ndarray | None = None
    row_sum_sum: np.ndarray | None = None
    real_rows: int = 0
    n_sequences: int = 0
    events: dict[str, np.ndarray] = field(default_factory=dict)
    token_text: dict[int, str] = field(default_factory=dict)
    learned_sink_sum: np.ndarray | None = None
    last_sum: np.ndarray | None = None
    per_sequence: np.ndarray | None = None  # [sequence, layer, head, position < PER_SEQUENCE_POSITIONS]
    attention: list[LayerAttention] = field(
        default_factory=list
    )  # what each collected layer's queries see (empty: causal)
    by_position: PositionProfile | None = None  # statistics per bin of query positions, when asked for
    norms: NormStats | None = None  # norm statistics, when collected with norms=True
    # running torch accumulators while collecting
    _acc: dict[str, Any] = field(default_factory=dict, repr=False)
    _ctx: BatchContext | None = field(default=None, init=False, repr=False)  # the batch being collected

    def __post_init__(self) -> None:
        if not self.attention:
            self.attention = [CAUSAL] * len(self.layers)

    # ------------------------------------------------------------------ accumulation

    def start(self, device: torch.device, attention: Sequence[LayerAttention] | None = None) -> None:
        """Allocate on-device accumulators (grown along the key axis as longer batches arrive).

        ``attention``: each collected layer's :class:`LayerAttention` (default: causal).
        """
        n_layers = len(self.layers)
        if attention is not None:
            if len(attention) != n_layers:
                raise InputError(f"got the attention kind of {len(attention)} layers for {n_layers} collected")
            self.attention = list(attention)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self._acc = {
            "received": zeros(n_layers, self.n_heads, 0),
            "count": zeros(0),
            "entropy": zeros(n_layers, self.n_heads),
            "entropy_rows": zeros(n_layers),
            "mass": zeros(n_layers, self.n_heads, len(CATEGORIES)),
            "row_sum": zeros(n_layers, self.n_heads),
            "sink": zeros(n_layers, self.n_heads),
            "last": zeros(n_layers, self.n_heads),
            "events": [],
            "per_sequence": [],
        }
        self._layer_slot = {layer: i for i, layer in enumerate(self.layers)}
        if self.by_position is not None:
            self.by_position.start(device)

    def begin_batch(self, ctx: BatchContext) -> None:
        """Count the batch's sequences, key positions and rows (once, not per layer)."""
        acc = self._acc
        length = ctx.real.shape[1]
        if acc["count"].shape[0] < length:
            grow = length - acc["count"].shape[0]
            acc["count"] = torch.nn.functional.pad(acc["count"], (0, grow))
            acc["received"] = torch.nn.functional.pad(acc["received"], (0, grow))
        acc["count"][:length] += ctx.real.sum(0).to(torch.float64)  # every real key is seen by itself
        self.n_sequences += int(ctx.real.shape[0])
        self.real_rows += int(ctx.real.sum())
        self._ctx = ctx
        self._ctx_on = {ctx.real.device: ctx}  # the batch's facts per device its layers run on
        if self.norms is not None:
            self.norms.begin_batch(self._batch_on)

    def _batch_on(self, device: torch.device) -> BatchContext:
        """The current batch context on ``device`` (a model may span devices: one copy per device)."""
        if device not in self._ctx_on:
            ctx = self._ctx
            if ctx is None:
                raise RuntimeError("no batch begun: begin_batch() comes before the layers' statistics")
            self._ctx_on[device] = BatchContext(
                real=ctx.real.to(device),
                categories=ctx.categories.to(device),
                tokens=ctx.tokens.to(device),
                sequence_ids=ctx.sequence_ids.to(device),
                last=None if ctx.last is None else ctx.last.to(device),
            )
        return self._ctx_on[device]

    def update(self, layer: int, pattern: torch.Tensor) -> None:
        """Fold one layer's pattern [batch, head, query, key] of the current batch into the sums."""
        self.update_block(layer, pattern)
        self.end_layer(layer)

    def update_block(
        self,
        layer: int,
        block: torch.Tensor,
        query_start: int = 0,
        key_start: int = 0,
        plogp: torch.Tensor | None = None,
    ) -> None:
        """Fold a block of one layer's pattern into the sums: rows are the batch's queries
        ``query_start ..`` and columns its keys ``key_start ..`` (a streaming engine's query blocks; the
        whole pattern for the hook engine). Call :meth:`end_layer` once the layer's blocks are all in.

        ``plogp`` [batch, head, row], when given, is ``sum_k p log p`` of each raw row (plus the
        learned sink's ``s log s``), from the scores and the log-sum-exp of an unedited softmax;
        outside a learned-sink layer such rows sum to 1, which saves summing them.
        """
        slot = self._layer_slot[layer]
        attention = self.attention[slot]
        p = block.detach()
        ctx = self._batch_on(p.device)
        if p.dtype not in (torch.float32, torch.float64):
            p = p.float()  # half-precision patterns are reduced in fp32 (sums in fp64)
        n_rows, n_cols = p.shape[-2:]
        real_q = ctx.real[:, query_start : query_start + n_rows].to(p.dtype)  # [batch, row]
        if plogp is not None and not attention.learned_sink:  # an unedited softmax: rows sum to 1
            row_sum = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device)
        else:
            row_sum = p.sum(-1)  # [batch, head, row]
        total = row_sum.clamp_min(1.0) if attention.learned_sink else row_sum  # keys + sink
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        # weight of each row once renormalised; pad rows weigh 0. A batched vector-matrix product
        # (einsum would copy p into a transposed layout first, which costs more than the product)
        row_weight = real_q[:, None] / safe_total
        column_sum = (row_weight.unsqueeze(-2) @ p).squeeze(-2)  # [batch, head, column]
        if plogp is None:
            plogp = _sum_plogp(p, attention, query_start, key_start)
            if attention.learned_sink:
                plogp = plogp + torch.special.xlogy(total - row_sum, total - row_sum)
        first = None
        if self.by_position is not None:
            first_col = ctx.first.to(p.device) - key_start  # [batch]: the first real token's column
            inside = ((first_col >= 0) & (first_col < n_cols)).to(p.dtype)[:, None, None]
            index = first_col.clamp(0, n_cols - 1)[:, None, None, None].expand(-1, p.shape[1], n_rows, 1)
            first = p.gather(3, index).squeeze(-1) * inside
        self._fold(slot, column_sum, row_sum, plogp, first, query_start, key_start)
        if self.norms is not None:
            self.norms.add_block(layer, p, query_start, key_start)

    def fused_request(self, n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a fused kernel needs to reduce a whole layer's rows ``0 .. n_rows`` for
        :meth:`update_reduced`: each row's weight in the column sums [batch, row] (1 for a real row, 0
        for padding) and, with position bins, the column whose probability each row reports (the
        first real token's, [batch]; else None)."""
        ctx = self._batch_on(device)
        weight = ctx.real[:, :n_rows].to(torch.float32)
        return weight, (ctx.first.to(device) if self.by_position is not None else None)

    def update_reduced(
        self,
        layer: int,
        column_sum: torch.Tensor,
        row_sum: torch.Tensor,
        plogp: torch.Tensor,
        first: torch.Tensor | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> None:
        """Fold a block already reduced by a kernel that computed an unedited softmax, with the
        weights of :meth:`fused_request`: ``column_sum`` [batch, head, column] (sum over rows of
        weight x p), ``row_sum`` and ``plogp`` (``sum_k p log p``, plus the learned sink's ``s log s``)
        [batch, head, row], and ``first`` (each row's probability of its first real token, with
        position bins). Such rows sum to 1 (to ``1 - s`` with a learned sink), so their weights need
        no renormalisation: the same sums as :meth:`update_block` of the block itself."""
        attention = self.attention[self._layer_slot[layer]]
        if not attention.learned_sink:
            row_sum = torch.ones_like(row_sum)
        self._fold(self._layer_slot[layer], column_sum, row_sum, plogp, first, query_start, key_start)

    def _fold(
        self,
        slot: int,
        column_sum: torch.Tensor,
        row_sum: torch.Tensor,
        plogp: torch.Tensor,
        first: torch.Tensor | None,
        query_start: int,
        key_start: int,
    ) -> None:
        """The sums of a block from its reductions (see :meth:`update_block`)."""
        acc = self._acc
        attention = self.attention[slot]
        device = acc["received"].device  # sums stay where start() put them
        ctx = self._batch_on(column_sum.device)
        dtype = column_sum.dtype
        n_rows, n_cols = row_sum.shape[-1], column_sum.shape[-1]
        rows = slice(query_start, query_start + n_rows)
        cols = slice(key_start, key_start + n_cols)
        _, n_keys = ctx.counts(attention)
        real_q = ctx.real[:, rows].to(dtype)  # [batch, row]
        total = row_sum.clamp_min(1.0) if attention.learned_sink else row_sum  # keys + sink
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        pending = acc.setdefault("pending", {})
        if slot not in pending:
            pending[slot] = torch.zeros(*column_sum.shape[:2], ctx.real.shape[1], dtype=dtype, device=column_sum.device)
        pending[slot][..., cols] += column_sum
        onehot = torch.nn.functional.one_hot(ctx.categories[:, cols], len(CATEGORIES)).to(dtype)
        acc["mass"][slot] += torch.einsum("bhk,bkc->hc", column_sum, onehot).to(device, torch.float64)
        acc["row_sum"][slot] += (row_sum * real_q[:, None]).sum((0, 2)).to(device, torch.float64)
        if attention.learned_sink:
            sink = total - row_sum  # the learned sink's raw share
            acc["sink"][slot] += (sink / safe_total * real_q[:, None]).sum((0, 2)).to(device, torch.float64)
        if ctx.last is not None:
            last = ctx.last.to(column_sum.device) - key_start  # [batch]: the last real token's column
            inside = ((last >= 0) & (last < n_cols)).to(dtype)[:, None, None]
            index = last.clamp(0, n_cols - 1)[:, None, None].expand(-1, column_sum.shape[1], 1)
            acc["last"][slot] += (column_sum.gather(2, index) * inside).sum((0, 2)).to(device, torch.float64)
        # normalised entropy of the renormalised row: H = log t - (1/t) (sum p log p + s log s)
        entropy = torch.log(safe_total) - plogp / safe_total
        outcomes = n_keys[:, rows].to(dtype)[:, None] + (1.0 if attention.learned_sink else 0.0)
        keep = (outcomes >= 2) & ctx.real[:, None, rows]
        log_n = torch.log(torch.where(keep, outcomes, torch.full_like(outcomes, 2.0)))
        normalised = torch.where(keep, entropy / log_n, torch.zeros_like(entropy))
        acc["entropy"][slot] += normalised.sum((0, 2)).to(device, torch.float64)
        acc["entropy_rows"][slot] += float(keep[:, 0].sum())
        if self.by_position is not None and first is not None:
            positions = torch.arange(query_start, query_start + n_rows, device=column_sum.device)[None]
            positions = positions - ctx.first[:, None]
            self.by_position.add(slot, positions, ctx.real[:, rows], first / safe_total, normalised, keep)

    def end_layer(self, layer: int) -> None:
        """Finish a layer of the current batch: alpha_k from its column sums, per-sequence alpha,
        hidden-sink candidates."""
        acc, slot = self._acc, self._layer_slot[layer]
        device = acc["received"].device
        column_sum = acc.get("pending", {}).pop(slot)
        ctx = self._batch_on(column_sum.device)
        n_queries, _ = ctx.counts(self.attention[slot])
        n_q = n_queries.to(column_sum.dtype)[:, None]
        alpha = column_sum / torch.where(n_q > 0, n_q, torch.ones_like(n_q))  # 0 on pad keys
        if self.norms is not None:
            self.norms.end_layer(layer, n_queries)
        length = alpha.shape[-1]
        acc["received"][slot, :, :length] += alpha.sum(0).to(device, torch.float64)
        # each sequence's own alpha at the first positions (Gu et al. threshold per sample)
        first = min(PER_SEQUENCE_POSITIONS, length)
        own = torch.where(
            ctx.real[:, None, :first], alpha[..., :first], torch.full_like(alpha[..., :first], float("nan"))
        )
        acc["per_sequence"].append((slot, ctx.sequence_ids.to(device), own.to(device, torch.float64)))
        # hidden-sink candidates (positions >= 1) above the recording floor
        hits = alpha > self.sink_floor
        hits[..., 0] = False
        if bool(hits.any()):
            b, h, k = hits.nonzero(as_tuple=True)
            acc["events"].append(
                torch.stack(
                    [
                        ctx.sequence_ids[b].to(torch.float64),
                        torch.full_like(b, layer, dtype=torch.float64),
                        h.to(torch.float64),
                        k.to(torch.float64),
                        ctx.tokens[b, k].to(torch.float64),
                        alpha[b, h, k].to(torch.float64),
                    ],
                    dim=1,
                ).to(device)
            )

    def finish(self, decode: Any = None) -> AttentionStats:
        """Move accumulators to numpy; ``decode(token_id) -> str`` names the sink tokens."""
        acc = self._acc
        self.received_sum = acc["received"].cpu().numpy()
        self.received_count = acc["count"].cpu().numpy()
        self.entropy_sum = acc["entropy"].cpu().numpy()
        self.entropy_rows = acc["entropy_rows"].cpu().numpy()
        self.mass_sum = acc["mass"].cpu().numpy()
        self.row_sum_sum = acc["row_sum"].cpu().numpy()
        self.learned_sink_sum = acc["sink"].cpu().numpy()
        self.last_sum = acc["last"].cpu().numpy()
        per_sequence = np.full((self.n_sequences, len(self.layers), self.n_heads, PER_SEQUENCE_POSITIONS), np.nan)
        for slot, ids, values in acc["per_sequence"]:
            per_sequence[ids.cpu().numpy(), slot, :, : values.shape[-1]] = values.cpu().numpy()
        self.per_sequence = per_sequence
        if self.by_position is not None:
            self.by_position.finish()
        if self.norms is not None:
            self.norms.finish()
        events = torch.cat(acc["events"]).cpu().numpy() if acc["events"] else np.zeros((0, len(_EVENT_FIELDS)))
        self.events = {name: events[:, i] for i, name in enumerate(_EVENT_FIELDS)}
        for name in _EVENT_FIELDS[:-1]:
            self.events[name] = self.events[name].astype(np.int64)
        if decode is not None:
            self.token_text = {int(t): decode(int(t)) for t in np.unique(self.events["token_id"])}
        self._acc = {}
        self._ctx = None
        self._ctx_on = {}
        return self

    # ------------------------------------------------------------------ results

    def _need(self) -> None:
        _filled(self.received_sum)

    @property
    def received(self) -> np.ndarray:
        """alpha_k [layer, head, key position], averaged over the sequences that have position k."""
        count = _filled(self.received_count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, _filled(self.received_sum) / np.where(count > 0, count, 1), np.nan)

    @property
    def entropy(self) -> np.ndarray:
        """Mean normalised row entropy [layer, head] (rows with >= 2 outcomes)."""
        rows = np.broadcast_to(np.asarray(self.entropy_rows, dtype=float), (len(self.layers),))
        return _filled(self.entropy_sum) / np.maximum(rows, 1)[:, None]

    @property
    def category_mass(self) -> np.ndarray:
        """Mean share of a row's attention on each token category [layer, head, category]."""
        return _filled(self.mass_sum) / max(self.real_rows, 1)

    @property
    def first_token_mass(self) -> np.ndarray:
        """Mean share of each row's attention on its first token (BOS or [CLS] when present) [layer, head]."""
        return self.category_mass[..., CATEGORIES.index("first")]

    @property
    def last_token_mass(self) -> np.ndarray:
        """Mean share of each row's attention on its sequence's last real token ([SEP] in an encoder's
        input) [layer, head]; NaN for statistics saved before it was collected."""
        self._need()
        if self.last_sum is None:
            return np.full((len(self.layers), self.n_heads), np.nan)
        return self.last_sum / max(self.real_rows, 1)

    @property
    def learned_sink_mass(self) -> np.ndarray:
        """Mean share of the learned sink, ``1 - sum_j p_ij``, over real rows [layer, head]; 0 in layers
        without a learned sink logit."""
        self._need()
        if self.learned_sink_sum is None:
            return np.zeros((len(self.layers), self.n_heads))
        return self.learned_sink_sum / max(self.real_rows, 1)

    @property
    def has_learned_sinks(self) -> bool:
        """Whether any collected layer has a learned sink logit."""
        return any(att.learned_sink for att in self.attention)

    @property
    def row_sum(self) -> np.ndarray:
        """Mean raw row sum [layer, head]: 1 for plain softmax, above 1 under an unnormalised boost,
        ``1 - learned_sink_mass`` for an unedited learned-sink layer."""
        return _filled(self.row_sum_sum) / max(self.real_rows, 1)

    def layer_index(self, layer: int) -> int:
        """Row of ``layer`` in the [layer, ...] arrays."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not collected (collected: {self.layers})")
        return self.layers.index(layer)

    def _per_sequence_default(self, per_sequence: bool | None) -> bool:
        if per_sequence is None:
            return self.metadata.get("protocol") == "gu2024"
        return bool(per_sequence)

    def sink_rate(self, eps: float = 0.3, position: int = 0, per_sequence: bool | None = None) -> float:
        """Gu et al.'s Sink_k^eps in percent: share of (layer, head) pairs with alpha_position > eps.

        ``per_sequence=True`` thresholds each sequence's own alpha and averages the indicator over
        sequences, layers and heads, as Gu et al.'s released code does (``(attn / arange(T, 0,
        -1)).sum(-2) > eps``); ``False`` thresholds the sequence-averaged alpha. ``None`` (the
        default) follows the collection's protocol: per sequence under ``protocol="gu2024"``.
        """
        if self._per_sequence_default(per_sequence):
            if self.per_sequence is None:
                raise InputError("these statistics were saved without per-sequence alpha: collect them again")
            if not 0 <= position < self.per_sequence.shape[-1]:
                raise InputError(
                    f"per-sequence alpha is kept for positions 0..{self.per_sequence.shape[-1] - 1}, "
                    f"got position {position}"
                )
            return metrics.sink_rate(self.per_sequence[..., position], eps)
        received = self.received
        if not 0 <= position < received.shape[-1]:
            raise InputError(f"position {position} out of range (0..{received.shape[-1] - 1})")
        return metrics.sink_rate(received[:, :, position], eps)

    def _layer_sink_rates(self, eps: float, per_sequence: bool | None) -> np.ndarray:
        if self._per_sequence_default(per_sequence) and self.per_sequence is not None:
            values = self.per_sequence[..., 0]
            with np.errstate(invalid="ignore"):
                return 100.0 * np.nanmean(np.where(np.isnan(values), np.nan, values > eps), axis=(0, 2))
        return 100.0 * (self.received[:, :, 0] > eps).mean(1)

    def hidden_sinks(self, tau: float = 0.1) -> Any:
        """ACT-style hidden sinks: per sequence, (layer, head, position) with alpha_k > tau, except the
        first position above tau, which ACT keeps as the attention sink (normally position 0).

        Returns a pandas DataFrame sorted by alpha, one row per (sequence, layer, head, position).
        """
        import pandas as pd

        if tau < self.sink_floor:
            raise InputError(f"tau={tau} is below the recording floor {self.sink_floor} used when collecting")
        frame = pd.DataFrame({k: v for k, v in self.events.items()})
        frame = frame[frame["alpha"] > tau].copy()
        if self.per_sequence is not None and len(frame):
            slot = frame["layer"].map({layer: i for i, layer in enumerate(self.layers)}).to_numpy()
            alpha0 = self.per_sequence[frame["sequence"].to_numpy(), slot, frame["head"].to_numpy(), 0]
            keys = ["sequence", "layer", "head"]
            first = frame["position"] == frame.groupby(keys)["position"].transform("min")
            frame = frame[~(first.to_numpy() & ~(alpha0 > tau))]  # position 0 below tau: the first is kept
        frame["token"] = frame["token_id"].map(lambda t: self.token_text.get(int(t), str(int(t))))
        return frame.sort_values("alpha", ascending=False).reset_index(drop=True)

    def to_frame(self) -> Any:
        """Tidy table, one row per (layer, head): first- and last-token mass, learned-sink mass,
        entropy, category shares, alpha_0, row sum."""
        import pandas as pd

        rows = []
        mass, received, last, sink = self.category_mass, self.received, self.last_token_mass, self.learned_sink_mass
        norm_columns = self._norm_head_columns()
        for i, layer in enumerate(self.layers):
            for head in range(self.n_heads):
                row = {
                    "layer": layer,
                    "head": head,
                    "first_token_mass": float(mass[i, head, 0]),
                    "entropy": float(self.entropy[i, head]),
                    "received_first": float(received[i, head, 0]),
                    "row_sum": float(self.row_sum[i, head]),
                }
                for c, name in enumerate(CATEGORIES[1:], start=1):
                    row[f"mass_{name}"] = float(mass[i, head, c])
                row["last_token_mass"] = float(last[i, head])
                row["learned_sink_mass"] = float(sink[i, head])
                row.update({name: float(values[i, head]) for name, values in norm_columns.items()})
                rows.append(row)
        return pd.DataFrame(rows)

    def received_frame(self) -> Any:
        """Long table of alpha_k: layer, head, position, received, n_sequences."""
        import pandas as pd

        received = self.received
        n_layers, n_heads, n_pos = received.shape
        layer = np.repeat(self.layers, n_heads * n_pos)
        head = np.tile(np.repeat(np.arange(n_heads), n_pos), n_layers)
        position = np.tile(np.arange(n_pos), n_layers * n_heads)
        return pd.DataFrame(
            {
                "layer": layer,
                "head": head,
                "position": position,
                "received": received.reshape(-1),
                "n_sequences": np.tile(_filled(self.received_count), n_layers * n_heads),
            }
        )

    def layer_summary(self, eps: float = 0.3, per_sequence: bool | None = None) -> Any:
        """Per layer: mean first- and last-token mass, learned-sink mass, entropy, and the sink rate
        (``eps``, position 0; thresholded as :meth:`sink_rate` does) over heads."""
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": self.layers,
                "first_token_mass": self.first_token_mass.mean(1),
                "entropy": self.entropy.mean(1),
                "sink_rate": self._layer_sink_rates(eps, per_sequence),
                "last_token_mass": self.last_token_mass.mean(1),
                "learned_sink_mass": self.learned_sink_mass.mean(1),
                "attention": [att.describe() for att in self.attention],
                **self._norm_layer_columns(),
            }
        )

    # ------------------------------------------------------------------ merge and persistence

    def merge(self, other: AttentionStats) -> AttentionStats:
        """Sum of two collections over the same layers and heads (e.g. two data shards)."""
        if self.layers != other.layers or self.n_heads != other.n_heads:
            raise InputError("can only merge statistics of the same layers and heads")
        if self.attention != other.attention:
            raise InputError("can only merge statistics of layers with the same attention (window, sinks)")
        mine, theirs = _Sums.of(self), _Sums.of(other)
        n = max(mine.received.shape[-1], theirs.received.shape[-1])
        grow = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])  # noqa: E731
        offset = self.n_sequences
        events = {
            k: np.concatenate([self.events[k], other.events[k] + (offset if k == "sequence" else 0)])
            for k in _EVENT_FIELDS
        }
        both = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        per_sequence = (
            None
            if self.per_sequence is None or other.per_sequence is None
            else np.concatenate([self.per_sequence, other.per_sequence])
        )
        rows = lambda s: np.broadcast_to(np.asarray(s.entropy_rows, dtype=float), (len(s.layers),))  # noqa: E731
        return AttentionStats(
            layers=list(self.layers),
            n_heads=self.n_heads,
            metadata={**self.metadata, "merged_with": other.metadata},
            sink_floor=max(self.sink_floor, other.sink_floor),
            received_sum=grow(mine.received) + grow(theirs.received),
            received_count=grow(mine.count) + grow(theirs.count),
            entropy_sum=mine.entropy + theirs.entropy,
            entropy_rows=rows(self) + rows(other),
            mass_sum=mine.mass + theirs.mass,
            row_sum_sum=mine.row_sum + theirs.row_sum,
            real_rows=self.real_rows + other.real_rows,
            n_sequences=self.n_sequences + other.n_sequences,
            events=events,
            token_text={**self.token_text, **other.token_text},
            learned_sink_sum=both(self.learned_sink_sum, other.learned_sink_sum),
            last_sum=both(self.last_sum, other.last_sum),
            per_sequence=per_sequence,
            attention=list(self.attention),
            by_position=(
                None
                if self.by_position is None or other.by_position is None
                else self.by_position.merge(other.by_position)
            ),
            norms=None if self.norms is None or other.norms is None else self.norms.merge(other.norms),
        )

    def save(self, path: str | Path) -> Path:
        """Write everything to one ``.npz`` file (arrays plus JSON metadata); returns the path."""
        self._need()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "layers": self.layers,
            "n_heads": self.n_heads,
            "metadata": self.metadata,
            "sink_floor": self.sink_floor,
            "real_rows": self.real_rows,
            "n_sequences": self.n_sequences,
            "token_text": {str(k): v for k, v in self.token_text.items()},
            "attention": [vars(att) for att in self.attention],
            "format": FORMAT,
        }
        sums = _Sums.of(self)
        arrays = {
            "received_sum": sums.received,
            "received_count": sums.count,
            "entropy_sum": sums.entropy,
            "mass_sum": sums.mass,
            "row_sum_sum": sums.row_sum,
            "entropy_rows": np.broadcast_to(np.asarray(self.entropy_rows, dtype=float), (len(self.layers),)),
        }
        for name in ("learned_sink_sum", "last_sum", "per_sequence"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        arrays.update({f"event_{k}": v for k, v in self.events.items()})
        if self.by_position is not None:
            arrays.update(self.by_position.arrays())
        if self.norms is not None:
            arrays.update(self.norms.arrays())
        with open(path, "wb") as handle:
            # numpy's stub checks **arrays against its allow_pickle: bool keyword too
            np.savez_compressed(handle, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionStats:
        """Read statistics written by :meth:`save` (this format, or an earlier one: without norms, windows)."""
        try:
            data = np.load(Path(path), allow_pickle=False)
            header = json.loads(str(data["header"]))
            optional = {
                name: data[name] if name in data.files else None
                for name in ("learned_sink_sum", "last_sum", "per_sequence")
            }
            rows = data["entropy_rows"] if "entropy_rows" in data.files else int(header["entropy_rows"])
            by_position = PositionProfile.from_arrays(data)
            norms = NormStats.from_arrays(data)
        except (OSError, KeyError, ValueError) as err:
            raise DataFileError(f"cannot read attention statistics from {path}: {err}") from None
        attention = [LayerAttention(**att) for att in header["attention"]] if "attention" in header else []
        return cls(
            layers=list(header["layers"]),
            n_heads=int(header["n_heads"]),
            metadata=header["metadata"],
            sink_floor=float(header["sink_floor"]),
            received_sum=data["received_sum"],
            received_count=data["received_count"],
            entropy_sum=data["entropy_sum"],
            entropy_rows=rows,
            mass_sum=data["mass_sum"],
            row_sum_sum=data["row_sum_sum"],
            real_rows=int(header["real_rows"]),
            n_sequences=int(header["n_sequences"]),
            events={k: data[f"event_{k}"] for k in _EVENT_FIELDS},
            token_text={int(k): v for k, v in header["token_text"].items()},
            attention=attention,
            by_position=by_position,
            learned_sink_sum=optional["learned_sink_sum"],
            last_sum=optional["last_sum"],
            per_sequence=optional["per_sequence"],
            norms=norms,
        )
