"""Streaming attention statistics: O(layers x heads x positions) accumulators fed inside hooks.

:class:`AttentionStats` is filled by :func:`tokext.collect_attention_stats`. Each ``hook_pattern``
call is folded into running sums (:meth:`AttentionStats.update`) and the pattern is dropped, so
memory never grows with sequences x positions^2. Stats are mergeable, saved as one ``.npz`` file,
and carry the metadata that made them (model, T, BOS handling, inputs).

Conventions (the formulas live in :mod:`tokext.attention.metrics`):
- ``received`` [layer, head, key]: alpha_k per sequence (mean over the real queries that see k),
  then averaged over the sequences that have a position k.
- ``entropy`` [layer, head]: normalised row entropy pooled over every real query row with at
  least two visible keys.
- ``category_mass`` [layer, head, category]: mean share of a real row's mass on each category.
- rows are renormalised over their visible keys before any of these; ``row_sum`` keeps the raw sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokext.errors import DataFileError, InputError
from tokext.attention import metrics
from tokext.attention.metrics import CATEGORIES

_EVENT_FIELDS = ("sequence", "layer", "head", "position", "token_id", "alpha")
_CHUNK_ELEMENTS = 1 << 22  # temporaries of at most 16 MiB (fp32) while reducing a pattern
_MIN_BLOCK_ROWS = 32  # query rows per block of the causal entropy reduction


def _sum_plogp(p: torch.Tensor) -> torch.Tensor:
    """sum_k p log p over the key axis [batch, head, query], in query blocks.

    A causal pattern is zero above the diagonal, so a block of queries ending at row ``e`` only
    reads keys ``:e``: the logarithm runs over about half the pattern, and the temporary stays small.
    """
    batch, heads, queries, keys = p.shape
    budget = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * keys))
    rows = min(budget, max(_MIN_BLOCK_ROWS, -(-queries // 8)))
    out = torch.empty(p.shape[:-1], dtype=p.dtype, device=p.device)
    offset = keys - queries  # keys before the first query (0 unless the pattern has a prefix)
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        block = p[:, :, start:stop, :min(keys, offset + stop)]
        out[:, :, start:stop] = torch.special.xlogy(block, block).sum(-1)
    return out


@dataclass
class BatchContext:
    """What the hooks need to know about the batch in flight (set by the collector per batch)."""

    real: torch.Tensor  # Bool [batch, pos]
    categories: torch.Tensor  # Long [batch, pos]
    tokens: torch.Tensor  # Long [batch, pos]
    sequence_ids: torch.Tensor  # Long [batch]
    n_queries: torch.Tensor  # float [batch, key]: real queries that see each key
    n_keys: torch.Tensor  # float [batch, query]: visible keys of each real query


@dataclass
class AttentionStats:
    """Per-layer, per-head attention statistics accumulated over a dataset (see module docstring)."""

    layers: list[int]
    n_heads: int
    metadata: dict[str, Any] = field(default_factory=dict)
    sink_floor: float = 0.05
    received_sum: np.ndarray | None = None
    received_count: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    entropy_rows: int = 0
    mass_sum: np.ndarray | None = None
    row_sum_sum: np.ndarray | None = None
    real_rows: int = 0
    n_sequences: int = 0
    events: dict[str, np.ndarray] = field(default_factory=dict)
    token_text: dict[int, str] = field(default_factory=dict)
    # running torch accumulators while collecting
    _acc: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ accumulation

    def start(self, device: torch.device) -> None:
        """Allocate on-device accumulators (grown along the key axis as longer batches arrive)."""
        n_layers = len(self.layers)
        self._acc = {
            "received": torch.zeros(n_layers, self.n_heads, 0, dtype=torch.float64, device=device),
            "count": torch.zeros(0, dtype=torch.float64, device=device),
            "entropy": torch.zeros(n_layers, self.n_heads, dtype=torch.float64, device=device),
            "mass": torch.zeros(n_layers, self.n_heads, len(CATEGORIES), dtype=torch.float64, device=device),
            "row_sum": torch.zeros(n_layers, self.n_heads, dtype=torch.float64, device=device),
            "events": [],
        }
        self._layer_slot = {layer: i for i, layer in enumerate(self.layers)}

    def begin_batch(self, ctx: BatchContext) -> None:
        """Count the batch's sequences, key positions and rows (once, not per layer)."""
        acc = self._acc
        length = ctx.real.shape[1]
        if acc["count"].shape[0] < length:
            grow = length - acc["count"].shape[0]
            acc["count"] = torch.nn.functional.pad(acc["count"], (0, grow))
            acc["received"] = torch.nn.functional.pad(acc["received"], (0, grow))
        acc["count"][:length] += (ctx.n_queries > 0).sum(0).to(torch.float64)
        self.n_sequences += int(ctx.real.shape[0])
        self.real_rows += int(ctx.real.sum())
        self.entropy_rows += int(((ctx.n_keys >= 2) & ctx.real).sum())
        self._ctx = ctx
        self._ctx_on = {ctx.real.device: ctx}  # the batch's facts per device its layers run on

    def _batch_on(self, device: torch.device) -> BatchContext:
        """The current batch context on ``device`` (a model may span devices: one copy per device)."""
        if device not in self._ctx_on:
            ctx = self._ctx
            self._ctx_on[device] = BatchContext(**{name: getattr(ctx, name).to(device) for name in ctx.__dataclass_fields__})
        return self._ctx_on[device]

    def update(self, layer: int, pattern: torch.Tensor) -> None:
        """Fold one layer's pattern [batch, head, query, key] of the current batch into the sums."""
        acc, slot = self._acc, self._layer_slot[layer]
        p = pattern.detach()
        ctx, home = self._batch_on(p.device), acc["entropy"].device  # sums stay where start() put them
        if p.dtype not in (torch.float32, torch.float64):
            p = p.float()
        real_q = ctx.real.to(p.dtype)  # [batch, query]
        row_sum = p.sum(-1)  # [batch, head, query]
        # weight of each row once renormalised over its visible keys; pad rows weigh 0
        row_weight = real_q[:, None] / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        # sum over real rows of p'; a batched vector-matrix product (einsum would copy p into a
        # transposed layout first, which costs more than the product itself)
        column_sum = (row_weight.unsqueeze(-2) @ p).squeeze(-2)
        n_q = ctx.n_queries.to(p.dtype)[:, None]
        alpha = column_sum / torch.where(n_q > 0, n_q, torch.ones_like(n_q))  # 0 on pad keys
        length = p.shape[-1]
        acc["received"][slot, :, :length] += alpha.sum(0).to(home, torch.float64)
        onehot = torch.nn.functional.one_hot(ctx.categories, len(CATEGORIES)).to(p.dtype)
        acc["mass"][slot] += torch.einsum("bhk,bkc->hc", column_sum, onehot).to(home, torch.float64)
        acc["row_sum"][slot] += (row_sum * real_q[:, None]).sum((0, 2)).to(home, torch.float64)
        # normalised entropy of the renormalised row: H = log s - (1/s) sum p log p
        plogp = _sum_plogp(p)
        safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        entropy = torch.log(safe_sum) - plogp / safe_sum
        n_k = ctx.n_keys.to(p.dtype)[:, None]
        keep = (n_k >= 2) & ctx.real[:, None]
        log_n = torch.log(torch.where(keep, n_k, torch.full_like(n_k, 2.0)))
        acc["entropy"][slot] += torch.where(keep, entropy / log_n, torch.zeros_like(entropy)).sum((0, 2)).to(home, torch.float64)
        # hidden-sink candidates (positions >= 1) above the recording floor
        hits = (alpha > self.sink_floor)
        hits[..., 0] = False
        if bool(hits.any()):
            b, h, k = hits.nonzero(as_tuple=True)
            acc["events"].append(torch.stack([
                ctx.sequence_ids[b].to(torch.float64), torch.full_like(b, layer, dtype=torch.float64),
                h.to(torch.float64), k.to(torch.float64), ctx.tokens[b, k].to(torch.float64),
                alpha[b, h, k].to(torch.float64),
            ], dim=1).to(home))

    def finish(self, decode: Any = None) -> "AttentionStats":
        """Move accumulators to numpy; ``decode(token_id) -> str`` names the sink tokens."""
        acc = self._acc
        self.received_sum = acc["received"].cpu().numpy()
        self.received_count = acc["count"].cpu().numpy()
        self.entropy_sum = acc["entropy"].cpu().numpy()
        self.mass_sum = acc["mass"].cpu().numpy()
        self.row_sum_sum = acc["row_sum"].cpu().numpy()
        events = torch.cat(acc["events"]).cpu().numpy() if acc["events"] else np.zeros((0, len(_EVENT_FIELDS)))
        self.events = {name: events[:, i] for i, name in enumerate(_EVENT_FIELDS)}
        for name in _EVENT_FIELDS[:-1]:
            self.events[name] = self.events[name].astype(np.int64)
        if decode is not None:
            self.token_text = {int(t): decode(int(t)) for t in np.unique(self.events["token_id"])}
        self._acc = {}
        self._ctx, self._ctx_on = None, {}
        return self

    # ------------------------------------------------------------------ results

    def _need(self) -> None:
        if self.received_sum is None:
            raise InputError("these statistics are empty: collect them first")

    @property
    def received(self) -> np.ndarray:
        """alpha_k [layer, head, key position], averaged over the sequences that have position k."""
        self._need()
        count = self.received_count
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, self.received_sum / np.where(count > 0, count, 1), np.nan)

    @property
    def entropy(self) -> np.ndarray:
        """Mean normalised row entropy [layer, head] (rows with >= 2 visible keys)."""
        self._need()
        return self.entropy_sum / max(self.entropy_rows, 1)

    @property
    def category_mass(self) -> np.ndarray:
        """Mean share of a row's attention on each token category [layer, head, category]."""
        self._need()
        return self.mass_sum / max(self.real_rows, 1)

    @property
    def first_token_mass(self) -> np.ndarray:
        """Mean share of each row's attention on its first token (BOS when present) [layer, head]."""
        return self.category_mass[..., CATEGORIES.index("first")]

    @property
    def row_sum(self) -> np.ndarray:
        """Mean raw row sum [layer, head]: 1 for plain softmax, above 1 under an unnormalised boost."""
        self._need()
        return self.row_sum_sum / max(self.real_rows, 1)

    def layer_index(self, layer: int) -> int:
        """Row of ``layer`` in the [layer, ...] arrays."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not collected (collected: {self.layers})")
        return self.layers.index(layer)

    def sink_rate(self, eps: float = 0.3, position: int = 0) -> float:
        """Gu et al.'s Sink_k^eps in percent: share of (layer, head) pairs with alpha_position > eps."""
        received = self.received
        if not 0 <= position < received.shape[-1]:
            raise InputError(f"position {position} out of range (0..{received.shape[-1] - 1})")
        return metrics.sink_rate(received[:, :, position], eps)

    def hidden_sinks(self, tau: float = 0.1) -> "Any":
        """ACT-style sinks: per sequence, (layer, head, position >= 1) with alpha_k > tau, and the token.

        Returns a pandas DataFrame sorted by alpha, one row per (sequence, layer, head, position).
        """
        import pandas as pd

        if tau < self.sink_floor:
            raise InputError(f"tau={tau} is below the recording floor {self.sink_floor} used when collecting")
        frame = pd.DataFrame({k: v for k, v in self.events.items()})
        frame = frame[frame["alpha"] > tau].copy()
        frame["token"] = frame["token_id"].map(lambda t: self.token_text.get(int(t), str(int(t))))
        return frame.sort_values("alpha", ascending=False).reset_index(drop=True)

    def to_frame(self) -> "Any":
        """Tidy table, one row per (layer, head): first-token mass, entropy, category shares, alpha_0, row sum."""
        import pandas as pd

        rows = []
        mass, received = self.category_mass, self.received
        for i, layer in enumerate(self.layers):
            for head in range(self.n_heads):
                row = {"layer": layer, "head": head, "first_token_mass": float(mass[i, head, 0]),
                       "entropy": float(self.entropy[i, head]), "received_first": float(received[i, head, 0]),
                       "row_sum": float(self.row_sum[i, head])}
                for c, name in enumerate(CATEGORIES[1:], start=1):
                    row[f"mass_{name}"] = float(mass[i, head, c])
                rows.append(row)
        return pd.DataFrame(rows)

    def received_frame(self) -> "Any":
        """Long table of alpha_k: layer, head, position, received, n_sequences."""
        import pandas as pd

        received = self.received
        n_layers, n_heads, n_pos = received.shape
        layer = np.repeat(self.layers, n_heads * n_pos)
        head = np.tile(np.repeat(np.arange(n_heads), n_pos), n_layers)
        position = np.tile(np.arange(n_pos), n_layers * n_heads)
        return pd.DataFrame({"layer": layer, "head": head, "position": position,
                             "received": received.reshape(-1),
                             "n_sequences": np.tile(self.received_count, n_layers * n_heads)})

    def layer_summary(self) -> "Any":
        """Per layer: mean first-token mass, mean entropy, sink rate (eps 0.3, position 0) over heads."""
        import pandas as pd

        received0 = self.received[:, :, 0]
        return pd.DataFrame({
            "layer": self.layers,
            "first_token_mass": self.first_token_mass.mean(1),
            "entropy": self.entropy.mean(1),
            "sink_rate": 100.0 * (received0 > 0.3).mean(1),
        })

    # ------------------------------------------------------------------ merge and persistence

    def merge(self, other: "AttentionStats") -> "AttentionStats":
        """Sum of two collections over the same layers and heads (e.g. two data shards)."""
        if self.layers != other.layers or self.n_heads != other.n_heads:
            raise InputError("can only merge statistics of the same layers and heads")
        n = max(self.received_sum.shape[-1], other.received_sum.shape[-1])
        grow = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])  # noqa: E731
        offset = self.n_sequences
        events = {k: np.concatenate([self.events[k], other.events[k] + (offset if k == "sequence" else 0)])
                  for k in _EVENT_FIELDS}
        return AttentionStats(
            layers=list(self.layers), n_heads=self.n_heads,
            metadata={**self.metadata, "merged_with": other.metadata}, sink_floor=max(self.sink_floor, other.sink_floor),
            received_sum=grow(self.received_sum) + grow(other.received_sum),
            received_count=grow(self.received_count) + grow(other.received_count),
            entropy_sum=self.entropy_sum + other.entropy_sum, entropy_rows=self.entropy_rows + other.entropy_rows,
            mass_sum=self.mass_sum + other.mass_sum, row_sum_sum=self.row_sum_sum + other.row_sum_sum,
            real_rows=self.real_rows + other.real_rows, n_sequences=self.n_sequences + other.n_sequences,
            events=events, token_text={**self.token_text, **other.token_text},
        )

    def save(self, path: str | Path) -> Path:
        """Write everything to one ``.npz`` file (arrays plus JSON metadata); returns the path."""
        self._need()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"layers": self.layers, "n_heads": self.n_heads, "metadata": self.metadata,
                  "sink_floor": self.sink_floor, "entropy_rows": self.entropy_rows, "real_rows": self.real_rows,
                  "n_sequences": self.n_sequences, "token_text": {str(k): v for k, v in self.token_text.items()},
                  "format": "tokext-attention-stats-1"}
        arrays = {"received_sum": self.received_sum, "received_count": self.received_count,
                  "entropy_sum": self.entropy_sum, "mass_sum": self.mass_sum, "row_sum_sum": self.row_sum_sum}
        arrays.update({f"event_{k}": v for k, v in self.events.items()})
        with open(path, "wb") as handle:
            np.savez_compressed(handle, header=np.array(json.dumps(header)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionStats":
        """Read statistics written by :meth:`save`."""
        try:
            data = np.load(Path(path), allow_pickle=False)
            header = json.loads(str(data["header"]))
        except (OSError, KeyError, ValueError) as err:
            raise DataFileError(f"cannot read attention statistics from {path}: {err}") from None
        return cls(
            layers=list(header["layers"]), n_heads=int(header["n_heads"]), metadata=header["metadata"],
            sink_floor=float(header["sink_floor"]), received_sum=data["received_sum"],
            received_count=data["received_count"], entropy_sum=data["entropy_sum"],
            entropy_rows=int(header["entropy_rows"]), mass_sum=data["mass_sum"], row_sum_sum=data["row_sum_sum"],
            real_rows=int(header["real_rows"]), n_sequences=int(header["n_sequences"]),
            events={k: data[f"event_{k}"] for k in _EVENT_FIELDS},
            token_text={int(k): v for k, v in header["token_text"].items()},
        )
