"""The norm statistics as :class:`~tokext.attention.stats.AttentionStats` shows them (``norms=True``).

:class:`NormResults` is mixed into ``AttentionStats``: the arrays of :class:`~tokext.attention.norms.NormStats`
and :class:`~tokext.attention.residual_stats.ResidualStats` under their public names, the massive-activation
table, inactive heads by head-output norm, and the columns ``to_frame()`` and ``layer_summary()`` gain.
Each raises an :class:`~tokext.errors.InputError` on statistics collected without ``norms=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokext.attention.norms import NormStats
from tokext.attention.residual import ABS_THRESHOLD, RATIO
from tokext.errors import InputError


def _rest_mean(x: np.ndarray) -> np.ndarray:
    """Mean over positions t > 0 of a [..., position] array (positions no sequence has are skipped)."""
    rest = x[..., 1:]
    count = np.isfinite(rest).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(rest, axis=-1) / np.maximum(count, 1), np.nan)


class NormResults:
    """Norm statistics of an ``AttentionStats`` (its ``norms`` field)."""

    norms: NormStats | None
    layers: list[int]
    n_heads: int
    token_text: dict[int, str]

    @property
    def has_norms(self) -> bool:
        """Whether these statistics were collected with ``norms=True``."""
        return self.norms is not None

    def _norms(self) -> NormStats:
        if self.norms is None:
            raise InputError("these statistics were collected without norms: collect them with norms=True")
        return self.norms

    @property
    def residual_norm(self) -> np.ndarray:
        """‖h_t‖₂ of block l's output [layer, position], averaged over the sequences that have position t."""
        return self._norms().residual_stats.residual_norm

    @property
    def key_norm(self) -> np.ndarray:
        """‖k_t‖₂ as the attention uses it (after RoPE and q/k norms) [layer, head, position]."""
        return self._norms().key_norm

    @property
    def value_norm(self) -> np.ndarray:
        """‖v_t‖₂ [layer, head, position] (a query head reads its KV head's values)."""
        return self._norms().value_norm

    @property
    def norm_weighted_received(self) -> np.ndarray:
        """Kobayashi et al.'s norm-weighted alpha_k [layer, head, key]: ``A_ij ‖v_j W_O^h‖`` row-normalised,
        averaged over the queries that see k and over the sequences that have k (as ``received``)."""
        return self._norms().norm_weighted_received

    @property
    def head_output_norm(self) -> np.ndarray:
        """Mean ‖z_i^h W_O^h‖₂ over real query rows [layer, head] (average head-output norm)."""
        return self._norms().head_output_norm

    @property
    def top_activations(self) -> np.ndarray:
        """The three largest |h| of a sequence at block l's output [layer, 3], averaged over sequences."""
        return self._norms().residual_stats.top_activations

    @property
    def median_activation(self) -> np.ndarray:
        """A sequence's median |h| at block l's output [layer], averaged over sequences."""
        return self._norms().residual_stats.median_activation

    def massive_activations(self, abs_threshold: float = ABS_THRESHOLD, ratio: float = RATIO) -> Any:
        """Massive activations (Sun et al. 2024): a tidy table (sequence, layer, position, token, dim, value)
        of the entries of block l's output with ``|h| > abs_threshold`` and ``|h| >= ratio x`` the
        sequence's median |h| at that layer, largest first. Only the
        :data:`~tokext.attention.residual_stats.MASSIVE_CAP` largest entries of each sequence and layer
        are kept while collecting; a warning says when that cap may hide more."""
        return self._norms().residual_stats.massive_activations(abs_threshold, ratio, self._decode)

    def _decode(self, token_id: int) -> str:
        return self.token_text.get(int(token_id), str(int(token_id)))

    def relative_head_output_norm(self) -> np.ndarray:
        """``head_output_norm`` divided by its mean over the layer's heads [layer, head]: 1 is a typical head
        of its layer, near 0 a head that writes almost nothing."""
        norm = self.head_output_norm
        mean = norm.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mean > 0, norm / np.where(mean > 0, mean, 1.0), np.nan)

    def inactive_heads(self, threshold: float = 0.5) -> Any:
        """Heads whose output is small for their layer: ``relative_head_output_norm < threshold``.

        After Sandoval-Segura et al. (ICLR 2026), whose head-output-norm score (AHON) finds inactive heads
        best when compared within the layer: here the head's mean ‖z_i^h W_O^h‖ over its layer's mean.
        A tidy table (layer, head, head_output_norm, relative_head_output_norm, first_token_mass,
        norm_weighted_received_first), smallest relative norm first. Their causal check (ablate the
        heads, measure the task) is left to the caller (:class:`~tokext.HeadAblation`).
        """
        import pandas as pd

        if not np.isfinite(threshold) or threshold < 0:
            raise InputError(f"threshold must be a finite number >= 0, got {threshold}")
        relative = self.relative_head_output_norm()
        first = self.first_token_mass  # type: ignore[attr-defined]
        weighted = self.norm_weighted_received[:, :, 0]
        rows = [
            {
                "layer": layer,
                "head": head,
                "head_output_norm": float(self.head_output_norm[i, head]),
                "relative_head_output_norm": float(relative[i, head]),
                "first_token_mass": float(first[i, head]),
                "norm_weighted_received_first": float(weighted[i, head]),
            }
            for i, layer in enumerate(self.layers)
            for head in range(self.n_heads)
            if relative[i, head] < threshold
        ]
        columns = [
            "layer",
            "head",
            "head_output_norm",
            "relative_head_output_norm",
            "first_token_mass",
            "norm_weighted_received_first",
        ]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.sort_values("relative_head_output_norm", kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ frame columns

    def _norm_head_columns(self) -> dict[str, np.ndarray]:
        """[layer, head] columns of ``to_frame()`` (none without norms)."""
        if self.norms is None:
            return {}
        key, value = self.key_norm, self.value_norm
        return {
            "norm_weighted_received_first": self.norm_weighted_received[:, :, 0],
            "head_output_norm": self.head_output_norm,
            "relative_head_output_norm": self.relative_head_output_norm(),
            "key_norm_first": key[:, :, 0],
            "key_norm_rest": _rest_mean(key),
            "value_norm_first": value[:, :, 0],
            "value_norm_rest": _rest_mean(value),
        }

    def _norm_layer_columns(self) -> dict[str, np.ndarray]:
        """[layer] columns of ``layer_summary()`` (none without norms): head means, Gu et al.'s norm ratios
        (position 0 over the mean of positions t > 0), and Sun et al.'s top |h| and median |h|."""
        if self.norms is None:
            return {}
        residual, key, value = self.residual_norm, self.key_norm.mean(1), self.value_norm.mean(1)
        top, median = self.top_activations[:, 0], self.median_activation
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "norm_weighted_received_first": self.norm_weighted_received[:, :, 0].mean(1),
                "head_output_norm": self.head_output_norm.mean(1),
                "residual_norm_first": residual[:, 0],
                "residual_norm_ratio": residual[:, 0] / _rest_mean(residual),
                "key_norm_ratio": key[:, 0] / _rest_mean(key),
                "value_norm_ratio": value[:, 0] / _rest_mean(value),
                "top_activation": top,
                "median_activation": median,
                "top_median_ratio": top / median,
            }
