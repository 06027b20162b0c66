"""Streaming statistics of the residual stream: norms per position and massive activations.

:class:`ResidualStats` is fed each collected block's output ``h`` [batch, position, dim] (the residual
stream after block l, TransformerLens's ``blocks.{l}.hook_out``) once per batch and reduces it at once,
so memory is O(layers x positions) plus a bounded list of candidate entries:

- ``residual_norm`` [layer, position]: ‖h_t‖₂ (Gu et al. 2024, Fig. 8), averaged over the sequences that
  have position t (as ``received`` is);
- ``top_activations`` [layer, 3] and ``median_activation`` [layer]: Sun et al. (2024)'s exp2: per
  sequence the three largest |h| over its real (position, dim) entries and its median |h|
  (:func:`~tokext.attention.residual.median_abs`), each averaged over sequences;
- massive-activation candidates: per sequence and layer the :data:`MASSIVE_CAP` entries of largest |h|
  with their position, dim, token and the sequence's median, so that
  :meth:`massive_activations` can apply the criterion of :func:`~tokext.attention.residual.massive_mask`
  for any thresholds later. A massive activation is among a sequence's largest entries, so the cap loses
  one only when more than :data:`MASSIVE_CAP` entries of one sequence and layer pass the criterion; the
  table then warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokext.attention.residual import ABS_THRESHOLD, RATIO, median_abs
from tokext.errors import InputError, TokextWarning

MASSIVE_CAP = 32
"""Entries of largest |h| kept per sequence and layer as massive-activation candidates."""
TOP = 3  # Sun et al.'s top-3
_MASSIVE_FIELDS = ("sequence", "layer", "position", "dim", "token_id", "value", "median")


def _filled(array: np.ndarray | None) -> np.ndarray:
    """``array`` of finished statistics; an error when nothing was collected."""
    if array is None:
        raise InputError("these residual-stream statistics are empty: collect them first")
    return array


@dataclass
class ResidualStats:
    """Per-layer residual-stream sums (see the module docstring). ``layers`` are the model's layer indices."""

    layers: list[int]
    norm_sum: np.ndarray | None = None  # [layer, position]
    count: np.ndarray | None = None  # [position]: sequences that have the position
    top_sum: np.ndarray | None = None  # [layer, TOP]
    median_sum: np.ndarray | None = None  # [layer]
    n_sequences: int = 0
    massive: dict[str, np.ndarray] = field(default_factory=dict)  # candidates, one entry per field
    _acc: dict = field(default_factory=dict, repr=False)

    def start(self, device: torch.device) -> None:
        """Allocate the sums on ``device`` (where the collected blocks' outputs are reduced)."""

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        n = len(self.layers)
        self._acc = {"norm": zeros(n, 0), "count": zeros(0), "top": zeros(n, TOP), "median": zeros(n), "massive": []}

    def begin_batch(self, real: torch.Tensor) -> None:
        """Count the sequences of a batch (``real`` Bool [batch, position]) and the positions they have."""
        acc = self._acc
        length = real.shape[1]
        if acc["count"].shape[0] < length:
            grow = length - acc["count"].shape[0]
            acc["count"] = torch.nn.functional.pad(acc["count"], (0, grow))
            acc["norm"] = torch.nn.functional.pad(acc["norm"], (0, grow))
        acc["count"][:length] += real.sum(0).to(acc["count"].device, torch.float64)
        self.n_sequences += int(real.shape[0])

    def add(
        self, slot: int, h: torch.Tensor, real: torch.Tensor, tokens: torch.Tensor, sequence_ids: torch.Tensor
    ) -> None:
        """Fold block ``slot``'s output ``h`` [batch, position, dim] of the current batch; ``real`` Bool
        [batch, position], ``tokens`` and ``sequence_ids`` [batch] on ``h``'s device."""
        acc = self._acc
        device = acc["norm"].device
        h = h.detach()
        values = h.float() if h.dtype not in (torch.float32, torch.float64) else h
        real = real.to(values.device)
        norms = torch.linalg.vector_norm(values, dim=-1) * real  # [batch, position]
        acc["norm"][slot, : norms.shape[1]] += norms.sum(0).to(device, torch.float64)
        median = median_abs(values, real)  # [batch]
        magnitude = values.abs().masked_fill(~real[..., None], -1.0).flatten(1)  # pads never selected
        k = min(MASSIVE_CAP, magnitude.shape[1])
        top, index = magnitude.topk(k, dim=1)  # [batch, k], largest first
        acc["top"][slot] += top[:, :TOP].sum(0).to(device, torch.float64)
        acc["median"][slot] += median.sum().to(device, torch.float64)
        dim = values.shape[-1]
        batch = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(index)
        position, feature = index // dim, index % dim
        keep = top >= 0
        acc["massive"].append(
            torch.stack(
                [
                    sequence_ids.to(values.device)[batch][keep].to(torch.float64),
                    torch.full_like(position[keep], self.layers[slot], dtype=torch.float64),
                    position[keep].to(torch.float64),
                    feature[keep].to(torch.float64),
                    tokens.to(values.device)[batch, position][keep].to(torch.float64),
                    values.flatten(1).gather(1, index)[keep].to(torch.float64),
                    median[:, None].expand_as(index)[keep].to(torch.float64),
                ],
                dim=1,
            ).to(device)
        )

    def finish(self) -> None:
        """Move the sums to numpy and gather the massive-activation candidates into one array per field."""
        acc = self._acc
        self.norm_sum = acc["norm"].cpu().numpy()
        self.count = acc["count"].cpu().numpy()
        self.top_sum = acc["top"].cpu().numpy()
        self.median_sum = acc["median"].cpu().numpy()
        rows = torch.cat(acc["massive"]).cpu().numpy() if acc["massive"] else np.zeros((0, len(_MASSIVE_FIELDS)))
        self.massive = {name: rows[:, i] for i, name in enumerate(_MASSIVE_FIELDS)}
        for name in _MASSIVE_FIELDS[:5]:
            self.massive[name] = self.massive[name].astype(np.int64)
        self._acc = {}

    # ------------------------------------------------------------------ results

    @property
    def residual_norm(self) -> np.ndarray:
        """‖h_t‖₂ [layer, position], averaged over the sequences that have position t."""
        count = _filled(self.count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, _filled(self.norm_sum) / np.where(count > 0, count, 1), np.nan)

    @property
    def top_activations(self) -> np.ndarray:
        """The three largest |h| of a sequence [layer, 3], averaged over sequences."""
        return _filled(self.top_sum) / max(self.n_sequences, 1)

    @property
    def median_activation(self) -> np.ndarray:
        """A sequence's median |h| [layer], averaged over sequences."""
        return _filled(self.median_sum) / max(self.n_sequences, 1)

    def massive_activations(
        self, abs_threshold: float = ABS_THRESHOLD, ratio: float = RATIO, decode: Callable[[int], str] | None = None
    ) -> Any:
        """Tidy table (sequence, layer, position, token, dim, value) of the entries with
        ``|h| > abs_threshold`` and ``|h| >= ratio x`` the sequence's median |h| at that layer
        (:func:`~tokext.attention.residual.massive_mask`), largest first."""
        import pandas as pd

        if abs_threshold < 0 or ratio < 0:
            raise InputError(f"abs_threshold and ratio must be >= 0, got {abs_threshold} and {ratio}")
        m = self.massive
        magnitude = np.abs(m["value"])
        hit = (magnitude > abs_threshold) & (magnitude >= ratio * m["median"])
        frame = pd.DataFrame({k: m[k][hit] for k in ("sequence", "layer", "position", "token_id", "dim", "value")})
        full = frame.groupby(["sequence", "layer"]).size()
        if len(full) and int(full.max()) >= MASSIVE_CAP:
            warnings.warn(
                f"{int((full >= MASSIVE_CAP).sum())} (sequence, layer) pairs have all {MASSIVE_CAP} kept entries "
                "above the thresholds: more massive activations may exist than listed",
                TokextWarning,
                stacklevel=2,
            )
        frame.insert(4, "token", [decode(int(t)) if decode else str(int(t)) for t in frame["token_id"]])
        order = np.argsort(-np.abs(frame["value"].to_numpy()), kind="stable")
        return frame.iloc[order].drop(columns="token_id").reset_index(drop=True)

    # ------------------------------------------------------------------ merge and persistence

    def merge(self, other: ResidualStats) -> ResidualStats:
        """The statistics of both collections together (``other``'s sequences numbered after these)."""
        if self.layers != other.layers:
            raise InputError("can only merge residual statistics of the same layers")
        n = max(_filled(self.count).shape[0], _filled(other.count).shape[0])

        def grow(array: np.ndarray | None) -> np.ndarray:
            array = _filled(array)
            return np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, n - array.shape[-1])])

        offset = self.n_sequences
        massive = {
            k: np.concatenate([self.massive[k], other.massive[k] + (offset if k == "sequence" else 0)])
            for k in _MASSIVE_FIELDS
        }
        return ResidualStats(
            layers=list(self.layers),
            norm_sum=grow(self.norm_sum) + grow(other.norm_sum),
            count=grow(self.count) + grow(other.count),
            top_sum=_filled(self.top_sum) + _filled(other.top_sum),
            median_sum=_filled(self.median_sum) + _filled(other.median_sum),
            n_sequences=self.n_sequences + other.n_sequences,
            massive=massive,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`AttentionStats.save` writes, keyed ``residual_*``."""
        out = {
            "residual_layers": np.asarray(self.layers),
            "residual_norm_sum": _filled(self.norm_sum),
            "residual_count": _filled(self.count),
            "residual_top_sum": _filled(self.top_sum),
            "residual_median_sum": _filled(self.median_sum),
            "residual_n_sequences": np.asarray(self.n_sequences),
        }
        out.update({f"residual_massive_{k}": v for k, v in self.massive.items()})
        return out

    @classmethod
    def from_arrays(cls, data: Any) -> ResidualStats | None:
        """Read what :meth:`arrays` wrote from ``data`` (an ``np.load`` archive); None when it holds none."""
        if "residual_layers" not in data.files:
            return None
        return cls(
            layers=[int(x) for x in data["residual_layers"]],
            norm_sum=data["residual_norm_sum"],
            count=data["residual_count"],
            top_sum=data["residual_top_sum"],
            median_sum=data["residual_median_sum"],
            n_sequences=int(data["residual_n_sequences"]),
            massive={k: data[f"residual_massive_{k}"] for k in _MASSIVE_FIELDS},
        )
