"""Norm statistics of attention: key, value and head-output norms, and norm-weighted received attention.

:class:`NormStats` is what :class:`~tokext.attention.stats.AttentionStats` holds when collected with
``norms=True``. It is fed, once per layer and batch, the keys and values as the attention uses them
(after RoPE and q/k norms; one per KV head, read by every query head of its group), each block of the
pattern (the same blocks as the other statistics, so both engines give the same numbers), the input of
the output projection (z) and the block's output (the residual stream, :mod:`~tokext.attention.residual_stats`).
Memory stays O(layers x heads x positions): nothing of size T² is kept.

With ``W_O^h`` head h's slice of the output projection (``d_head x d_model``, no bias):

- ``key_norm``, ``value_norm`` [layer, head, position]: ‖k_t‖₂ and ‖v_t‖₂ of the head's KV head;
- ``norm_weighted_received`` [layer, head, key]: Kobayashi et al. (2020)'s norm-based attention
  ``N_ij = A_ij ‖v_j W_O^h‖₂``, row-normalised over the keys row i sees (``Ñ_ij = N_ij / Σ_j' N_ij'``; a
  learned sink carries no value, so it takes no share) and averaged over the real queries that see key j,
  exactly as ``received`` averages ``A_ij``;
- ``head_output_norm`` [layer, head]: the mean over real query rows of ‖z_i^h W_O^h‖₂ (Sandoval-Segura et
  al.'s average head-output norm);
- per-position arrays are averaged over the sequences that have the position, as ``received`` is.

‖x W_O^h‖₂ is computed as ‖x L_h‖₂ with ``L_h = U_h S_h`` from the SVD ``W_O^h = U_h S_h V_hᵀ`` (d_head x
d_head, computed once per collection in float64: ``L_h L_hᵀ = W_O^h W_O^hᵀ``), so no ``[.., d_model]`` product
per head is ever formed, and the norm of a small output is not lost to cancellation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokext.attention.residual_stats import ResidualStats, _filled
from tokext.errors import InputError, InterventionNotAppliedError


def output_factor(w_o: torch.Tensor) -> torch.Tensor:
    """``L`` [head, d_head, d_head] with ``L_h L_hᵀ = W_O^h W_O^hᵀ`` for ``w_o`` [head, d_head, d_model]
    (``U_h S_h`` of the SVD, in float64), so that ‖x W_O^h‖₂ = ‖x L_h‖₂."""
    u, s, _ = torch.linalg.svd(w_o.detach().to(torch.float64), full_matrices=False)
    return u * s[:, None, :]


def output_norms(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """‖x_h W_O^h‖₂ for x [..., head, d_head] and ``factor`` = :func:`output_factor` of W_O -> [..., head]
    (in x's precision, at least float32).

    >>> w = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])  # one head, W_O^h = diag(3, 4)
    >>> output_norms(torch.tensor([[1.0, 1.0]]), output_factor(w)).tolist()
    [5.0]
    """
    x = x.detach()
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = torch.einsum("...hd,hde->...he", x.to(dtype), factor.to(x.device, dtype))
    return torch.linalg.vector_norm(y, dim=-1)


@dataclass
class NormStats:
    """Per-layer, per-head norm sums (see the module docstring); ``layers`` are the model's layer indices."""

    layers: list[int]
    n_heads: int
    key_sum: np.ndarray | None = None  # [layer, head, position]
    value_sum: np.ndarray | None = None
    weighted_sum: np.ndarray | None = None
    count: np.ndarray | None = None  # [position]: sequences that have the position
    head_output_sum: np.ndarray | None = None  # [layer, head]
    real_rows: int = 0
    residual: ResidualStats | None = None
    _acc: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.residual is None:
            self.residual = ResidualStats(list(self.layers))
        self._batch_on: Callable[[torch.device], Any] | None = None  # set by begin_batch, cleared by finish

    @property
    def residual_stats(self) -> ResidualStats:
        """``residual``, checked present (``__post_init__`` creates it when none is given)."""
        if self.residual is None:
            raise InputError("these norm statistics have no residual-stream statistics: collect them first")
        return self.residual

    def _batch(self, device: torch.device) -> Any:
        """The current batch's :class:`~tokext.attention.stats.BatchContext` on ``device``."""
        if self._batch_on is None:
            raise InputError("no batch of norm statistics is open: begin_batch first")
        return self._batch_on(device)

    # ------------------------------------------------------------------ accumulation

    def start(self, device: torch.device, factors: Sequence[torch.Tensor]) -> None:
        """Allocate the sums; ``factors[slot]`` is :func:`output_factor` of each collected layer's W_O."""
        if len(factors) != len(self.layers):
            raise InputError(f"got output projections of {len(factors)} layers for {len(self.layers)} collected")

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        n, h = len(self.layers), self.n_heads
        self._acc = {
            "key": zeros(n, h, 0),
            "value": zeros(n, h, 0),
            "weighted": zeros(n, h, 0),
            "count": zeros(0),
            "head_output": zeros(n, h),
            "factors": [f.to(torch.float64) for f in factors],
            "value_out": {},  # slot -> ‖v_j W_O^h‖ [batch, head, key] of the current batch
            "pending": {},  # slot -> column sums of Ñ [batch, head, key] of the current batch
        }
        self.residual_stats.start(device)

    def begin_batch(self, batch_on: Callable[[torch.device], Any]) -> None:
        """A new batch; ``batch_on(device)`` gives its :class:`~tokext.attention.stats.BatchContext`."""
        acc = self._acc
        self._batch_on = batch_on
        real = batch_on(acc["count"].device).real
        length = real.shape[1]
        if acc["count"].shape[0] < length:
            grow = length - acc["count"].shape[0]
            acc["count"] = torch.nn.functional.pad(acc["count"], (0, grow))
            for name in ("key", "value", "weighted"):
                acc[name] = torch.nn.functional.pad(acc[name], (0, grow))
        acc["count"][:length] += real.sum(0).to(torch.float64)
        self.real_rows += int(real.sum())
        self.residual_stats.begin_batch(real)
        acc["value_out"].clear()
        acc["pending"].clear()

    def _per_query_head(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, kv head, ...] -> [batch, head, ...]: query head h reads KV head ``h // (heads / kv heads)``."""
        kv = x.shape[1]
        if self.n_heads % kv:
            raise InputError(f"{self.n_heads} query heads cannot share {kv} key/value heads")
        groups = self.n_heads // kv
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    def add_keys(self, layer: int, key: torch.Tensor) -> None:
        """Fold layer ``layer``'s keys [batch, kv head, position, d_head] as the attention uses them."""
        self._add_norms("key", layer, key)

    def add_values(self, layer: int, value: torch.Tensor) -> None:
        """Fold layer ``layer``'s values [batch, kv head, position, d_head]; keeps ‖v_j W_O^h‖ for the
        layer's pattern blocks."""
        self._add_norms("value", layer, value)
        values = self._per_query_head(value.detach()).transpose(1, 2)  # [batch, position, head, d_head]
        acc, slot = self._acc, self.layers.index(layer)
        acc["value_out"][slot] = output_norms(values, acc["factors"][slot]).transpose(1, 2)  # [batch, head, key]

    def _add_norms(self, name: str, layer: int, x: torch.Tensor) -> None:
        acc, slot = self._acc, self.layers.index(layer)
        ctx = self._batch(x.device)
        length = ctx.real.shape[1]
        if x.dim() != 4 or x.shape[2] != length:
            raise InputError(f"layer {layer}: got {name}s of shape {tuple(x.shape)} for a batch of {length} positions")
        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        norms = self._per_query_head(torch.linalg.vector_norm(x, dim=-1))  # [batch, head, position]
        acc[name][slot, :, :length] += (norms * ctx.real[:, None]).sum(0).to(acc[name].device, torch.float64)

    def add_block(self, layer: int, block: torch.Tensor, query_start: int, key_start: int) -> None:
        """Fold a block of layer ``layer``'s pattern (rows ``query_start..``, columns ``key_start..``, the
        same blocks :meth:`AttentionStats.update_block` sees) into the norm-weighted column sums."""
        acc, slot = self._acc, self.layers.index(layer)
        value_out = acc["value_out"].get(slot)
        if value_out is None:
            raise InterventionNotAppliedError(
                f"layer {layer}: its pattern arrived before its values, so norm-weighted attention cannot be formed"
            )
        p = block.detach()
        if p.dtype not in (torch.float32, torch.float64):
            p = p.float()
        ctx = self._batch(p.device)
        n_rows, n_cols = p.shape[-2:]
        u = value_out[..., key_start : key_start + n_cols].to(p.device, p.dtype)  # [batch, head, column]
        # Σ_j N_ij = Σ_j A_ij u_j, and Σ_i w_i N_ij / Σ_j' N_ij' = u_j Σ_i (w_i / r_i) A_ij: two products, no N
        row_total = torch.einsum("bhqk,bhk->bhq", p, u)  # [batch, head, row]
        real_q = ctx.real[:, query_start : query_start + n_rows].to(p.dtype)[:, None]
        weight = torch.where(row_total > 0, real_q / torch.where(row_total > 0, row_total, 1.0), 0.0)
        column = (weight.unsqueeze(-2) @ p).squeeze(-2) * u  # [batch, head, column]
        pending = acc["pending"]
        if slot not in pending:
            pending[slot] = torch.zeros(*column.shape[:2], ctx.real.shape[1], dtype=p.dtype, device=p.device)
        pending[slot][..., key_start : key_start + n_cols] += column

    def end_layer(self, layer: int, n_queries: torch.Tensor) -> None:
        """Finish layer ``layer`` of the batch: each sequence's norm-weighted alpha, from the column sums and
        ``n_queries`` [batch, key] (the real queries that see each key in this layer)."""
        acc, slot = self._acc, self.layers.index(layer)
        column = acc["pending"].pop(slot, None)
        acc["value_out"].pop(slot, None)
        if column is None:
            return
        n_q = n_queries.to(column.device, column.dtype)[:, None]
        alpha = column / torch.where(n_q > 0, n_q, torch.ones_like(n_q))  # 0 on pad keys
        acc["weighted"][slot, :, : alpha.shape[-1]] += alpha.sum(0).to(acc["weighted"].device, torch.float64)

    def add_head_output(self, layer: int, z: torch.Tensor) -> None:
        """Fold the input of layer ``layer``'s output projection, z [batch, position, head x d_head]."""
        acc, slot = self._acc, self.layers.index(layer)
        ctx = self._batch(z.device)
        per_head = z.reshape(*z.shape[:2], self.n_heads, -1)
        norms = output_norms(per_head, acc["factors"][slot])  # [batch, position, head]
        real = ctx.real[..., None].to(torch.float64)
        acc["head_output"][slot] += (norms * real).sum((0, 1)).to(acc["head_output"].device)

    def add_residual(self, layer: int, h: torch.Tensor) -> None:
        """Fold block ``layer``'s output h [batch, position, d_model]."""
        ctx = self._batch(h.device)
        self.residual_stats.add(self.layers.index(layer), h, ctx.real, ctx.tokens, ctx.sequence_ids)

    def finish(self) -> NormStats:
        """Move the sums to numpy (the residual-stream statistics too) and close the collection."""
        acc = self._acc
        self.key_sum = acc["key"].cpu().numpy()
        self.value_sum = acc["value"].cpu().numpy()
        self.weighted_sum = acc["weighted"].cpu().numpy()
        self.count = acc["count"].cpu().numpy()
        self.head_output_sum = acc["head_output"].cpu().numpy()
        self.residual_stats.finish()
        self._acc = {}
        self._batch_on = None
        return self

    # ------------------------------------------------------------------ results

    def _per_position(self, total: np.ndarray | None) -> np.ndarray:
        count = _filled(self.count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, _filled(total) / np.where(count > 0, count, 1), np.nan)

    @property
    def key_norm(self) -> np.ndarray:
        """‖k_t‖₂ [layer, head, position], averaged over the sequences that have position t."""
        return self._per_position(self.key_sum)

    @property
    def value_norm(self) -> np.ndarray:
        """‖v_t‖₂ [layer, head, position], averaged over the sequences that have position t."""
        return self._per_position(self.value_sum)

    @property
    def norm_weighted_received(self) -> np.ndarray:
        """Norm-weighted alpha [layer, head, key], averaged over the sequences that have the key."""
        return self._per_position(self.weighted_sum)

    @property
    def head_output_norm(self) -> np.ndarray:
        """Mean ‖z_i^h W_O^h‖₂ over real query rows [layer, head]."""
        return _filled(self.head_output_sum) / max(self.real_rows, 1)

    # ------------------------------------------------------------------ merge and persistence

    def merge(self, other: NormStats) -> NormStats:
        """The statistics of both collections together (the residual-stream statistics merged too)."""
        if self.layers != other.layers or self.n_heads != other.n_heads:
            raise InputError("can only merge norm statistics of the same layers and heads")
        n = max(_filled(self.count).shape[0], _filled(other.count).shape[0])

        def grow(array: np.ndarray | None) -> np.ndarray:
            array = _filled(array)
            return np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, n - array.shape[-1])])

        return NormStats(
            layers=list(self.layers),
            n_heads=self.n_heads,
            key_sum=grow(self.key_sum) + grow(other.key_sum),
            value_sum=grow(self.value_sum) + grow(other.value_sum),
            weighted_sum=grow(self.weighted_sum) + grow(other.weighted_sum),
            count=grow(self.count) + grow(other.count),
            head_output_sum=_filled(self.head_output_sum) + _filled(other.head_output_sum),
            real_rows=self.real_rows + other.real_rows,
            residual=self.residual_stats.merge(other.residual_stats),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`AttentionStats.save` writes, keyed ``norm_*`` and ``residual_*``."""
        out = {
            "norm_layers": np.asarray(self.layers),
            "norm_key_sum": _filled(self.key_sum),
            "norm_value_sum": _filled(self.value_sum),
            "norm_weighted_sum": _filled(self.weighted_sum),
            "norm_count": _filled(self.count),
            "norm_head_output_sum": _filled(self.head_output_sum),
            "norm_real_rows": np.asarray(self.real_rows),
        }
        out.update(self.residual_stats.arrays())
        return out

    @classmethod
    def from_arrays(cls, data: Any) -> NormStats | None:
        """Read what :meth:`arrays` wrote from ``data`` (an ``np.load`` archive); None when it holds none."""
        if "norm_layers" not in data.files:
            return None
        key = data["norm_key_sum"]
        return cls(
            layers=[int(x) for x in data["norm_layers"]],
            n_heads=int(key.shape[1]),
            key_sum=key,
            value_sum=data["norm_value_sum"],
            weighted_sum=data["norm_weighted_sum"],
            count=data["norm_count"],
            head_output_sum=data["norm_head_output_sum"],
            real_rows=int(data["norm_real_rows"]),
            residual=ResidualStats.from_arrays(data),
        )
