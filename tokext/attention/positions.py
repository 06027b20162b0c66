"""Attention statistics against query position: first-token mass and entropy per position bin.

StreamingLLM's question (does the initial token keep its share of attention as the context grows?)
needs the statistics of :class:`~tokext.attention.stats.AttentionStats` resolved by where the query
sits, not pooled over every row. :class:`PositionProfile` keeps, per layer, head and bin of query
positions, the sum of each real row's first-token mass and of its normalised entropy, so memory is
O(layers x heads x bins) at any length. It is fed from inside
:meth:`AttentionStats.update_block`, with the same renormalised rows, so it gives the same numbers
under the hook engine and the streaming engine.

A query's position counts from its row's first real token (0 = the first token itself), so left
padding does not shift it. Bin ``j`` holds positions ``edges[j] <= position < edges[j + 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokext.errors import InputError


def log_position_bins(length: int, per_octave: int = 2) -> list[int]:
    """Bin edges from 0 to ``length``, about ``per_octave`` bins per doubling of the query position
    (position 0 and 1 alone, then geometric), so short and long contexts are resolved alike.

    >>> log_position_bins(16, per_octave=1)
    [0, 1, 2, 4, 8, 16]
    """
    if length < 1:
        raise InputError(f"length must be at least 1, got {length}")
    if per_octave < 1:
        raise InputError(f"per_octave must be at least 1, got {per_octave}")
    edges = {0, 1, length}
    step = 2.0 ** (1.0 / per_octave)
    value = 2.0
    while value < length:
        edges.add(int(round(value)))
        value *= step
    return sorted(edges)


def check_bins(edges: Sequence[int]) -> list[int]:
    """``edges`` as a list of increasing, non-negative integers (at least one bin), else an InputError."""
    edges = [int(e) for e in edges]
    if len(edges) < 2:
        raise InputError(f"position bins need at least two edges, got {edges}")
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise InputError(f"position bin edges must be non-negative and increasing, got {edges}")
    return edges


@dataclass
class PositionProfile:
    """Per-(layer, head, position bin) sums of first-token mass and normalised entropy.

    ``rows`` [layer, bin] counts the real rows in each bin (every real row for the first-token mass);
    ``entropy_rows`` [layer, bin] those with at least two outcomes (the entropy's rows).
    """

    edges: list[int]
    n_layers: int
    n_heads: int
    first_sum: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    rows: np.ndarray | None = None
    entropy_rows: np.ndarray | None = None
    _acc: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.edges = check_bins(self.edges)

    @property
    def n_bins(self) -> int:
        """Number of position bins (one fewer than the edges)."""
        return len(self.edges) - 1

    def start(self, device: torch.device) -> None:
        """Allocate the running sums (float64) on ``device`` before the first batch."""
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        bins = self.n_bins
        self._acc = {
            "first": zeros(self.n_layers, self.n_heads, bins),
            "entropy": zeros(self.n_layers, self.n_heads, bins),
            "rows": zeros(self.n_layers, bins),
            "entropy_rows": zeros(self.n_layers, bins),
        }
        self._edges = torch.tensor(self.edges, dtype=torch.long, device=device)

    def add(
        self,
        slot: int,
        positions: torch.Tensor,
        real: torch.Tensor,
        first_mass: torch.Tensor,
        entropy: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Fold a block of rows of layer ``slot``: ``positions`` [batch, row] (from the first real token),
        ``real`` [batch, row], ``first_mass`` and ``entropy`` (normalised) [batch, head, row], ``keep``
        [batch, head, row] the rows the entropy counts."""
        acc = self._acc
        device = acc["first"].device
        index = torch.bucketize(positions, self._edges, right=True) - 1  # [batch, row]
        inside = (index >= 0) & (index < self.n_bins) & real
        index = index.clamp(0, self.n_bins - 1)
        heads = first_mass.shape[1]
        weight = inside[:, None].to(first_mass.dtype)
        target = index[:, None].expand_as(first_mass).permute(1, 0, 2).reshape(heads, -1).to(device)
        first = (first_mass * weight).permute(1, 0, 2).reshape(heads, -1).to(device, torch.float64)
        acc["first"][slot].scatter_add_(1, target, first)
        kept = keep & inside[:, None]
        ent = torch.where(kept, entropy, torch.zeros_like(entropy)).permute(1, 0, 2).reshape(heads, -1)
        acc["entropy"][slot].scatter_add_(1, target, ent.to(device, torch.float64))
        acc["rows"][slot].scatter_add_(
            0, index[inside].to(device), torch.ones(int(inside.sum()), dtype=torch.float64, device=device)
        )
        kept_rows = kept[:, 0]
        acc["entropy_rows"][slot].scatter_add_(
            0, index[kept_rows].to(device), torch.ones(int(kept_rows.sum()), dtype=torch.float64, device=device)
        )

    def finish(self) -> None:
        """Move the running sums to numpy arrays once the last batch is in."""
        acc = self._acc
        self.first_sum = acc["first"].cpu().numpy()
        self.entropy_sum = acc["entropy"].cpu().numpy()
        self.rows = acc["rows"].cpu().numpy()
        self.entropy_rows = acc["entropy_rows"].cpu().numpy()
        self._acc = {}

    # ------------------------------------------------------------------ results

    def _sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(first_sum, entropy_sum, rows, entropy_rows)`` of a finished profile."""
        if self.first_sum is None or self.entropy_sum is None or self.rows is None or self.entropy_rows is None:
            raise InputError("this position profile is empty: collect it first")
        return self.first_sum, self.entropy_sum, self.rows, self.entropy_rows

    @property
    def first_token_mass(self) -> np.ndarray:
        """Mean first-token mass of the rows in each bin [layer, head, bin]; NaN for an empty bin."""
        first_sum, _, rows, _ = self._sums()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows[:, None] > 0, first_sum / np.maximum(rows, 1)[:, None], np.nan)

    @property
    def entropy(self) -> np.ndarray:
        """Mean normalised entropy of the rows in each bin [layer, head, bin]; NaN for an empty bin."""
        _, entropy_sum, _, entropy_rows = self._sums()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(entropy_rows[:, None] > 0, entropy_sum / np.maximum(entropy_rows, 1)[:, None], np.nan)

    def merge(self, other: PositionProfile) -> PositionProfile:
        """The profile of both runs (same bins, layers and heads), as if one run had seen all the rows."""
        if self.edges != other.edges or (self.n_layers, self.n_heads) != (other.n_layers, other.n_heads):
            raise InputError("can only merge position profiles with the same bins, layers and heads")
        first, entropy, rows, entropy_rows = (a + b for a, b in zip(self._sums(), other._sums()))
        return PositionProfile(
            edges=list(self.edges),
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            first_sum=first,
            entropy_sum=entropy,
            rows=rows,
            entropy_rows=entropy_rows,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`AttentionStats.save` writes, keyed ``position_*``."""
        first, entropy, rows, entropy_rows = self._sums()
        return {
            "position_edges": np.asarray(self.edges),
            "position_first_sum": first,
            "position_entropy_sum": entropy,
            "position_rows": rows,
            "position_entropy_rows": entropy_rows,
        }

    @classmethod
    def from_arrays(cls, data: np.lib.npyio.NpzFile) -> PositionProfile | None:
        """The profile stored by :meth:`arrays` in ``data``, or ``None`` when it holds none."""
        if "position_edges" not in data.files:
            return None
        first = data["position_first_sum"]
        return cls(
            edges=[int(e) for e in data["position_edges"]],
            n_layers=first.shape[0],
            n_heads=first.shape[1],
            first_sum=first,
            entropy_sum=data["position_entropy_sum"],
            rows=data["position_rows"],
            entropy_rows=data["position_entropy_rows"],
        )

    def to_frame(self, layers: Sequence[int]) -> Any:
        """Long table: layer, bin_start, bin_stop, rows, first_token_mass and entropy (means over heads)."""
        import pandas as pd

        first, entropy, rows = self.first_token_mass, self.entropy, self._sums()[2]
        records = []
        for slot, layer in enumerate(layers):
            for b in range(self.n_bins):
                records.append(
                    {
                        "layer": layer,
                        "bin_start": self.edges[b],
                        "bin_stop": self.edges[b + 1],
                        "rows": int(rows[slot, b]),
                        "first_token_mass": float(np.mean(first[slot, :, b])),
                        "entropy": float(np.mean(entropy[slot, :, b])),
                    }
                )
        return pd.DataFrame(records)
