"""ACT's calibration of a layer from one pass of the fused kernel, through its few sink columns.

Why. ACT (:class:`~tokext.interventions.SinkCalibration`) edits a row only after every row has been
seen: its sinks ``S`` are the keys whose mean received attention exceeds ``tau``. Run as an edit of
the kernel, that is two passes over the layer's scores (column sums, then the edited softmax and
``P V``): about 1.5x SDPA's attention at 2,048 tokens on SmolLM2. But the edit is two gains per row,
``on`` on the sink columns and ``off`` elsewhere (``on = beta``, ``off = 1 + (1 - beta) t / r`` with
``t`` the row's mass on ``S`` and ``r`` the rest), so with ``y = sum_{k in S} p_k v_k``:

    out' = sum_k p_k g_k v_k = off * out + (on - off) * y

One kernel pass gives ``out``, the column sums (hence ``S``), each row's sum and its log-sum-exp;
``y`` and ``t`` need only the scores of the few sink keys (ACT finds a handful per head; at most 8
on SmolLM2 at 2,048 tokens), recomputed here as ``exp(s - lse)``. The sum is less exact than the
two passes: ``out`` holds the sink columns' probabilities as the kernel rounded them and ``y`` as
recomputed here, and their difference is multiplied by ``off``. So rows with ``off`` above
:data:`EXACT_ABOVE` are recomputed whole, from their scores against every key, as the two-pass kernel
would; too many sinks or too many such rows, and the caller runs the two passes instead. Measured:
against ACT's formula in float64, 1.4e-6 here and 3e-7 for the two passes (unit-scale inputs, a
heavy key; ``tests/test_fused_kernel.py``); on SmolLM2 at 2,048 tokens every layer took this path
and the logits differ from the pure-torch engine's by 7.4e-5 at most, as the two passes' do.
"""

from __future__ import annotations

from typing import Any

import torch

from tokext.attention.masks import within_reach
from tokext.models.architectures import LayerAttention

MAX_SINK_KEYS = 64
"""More sink keys than this in one head: the two-pass kernel (the gathered columns would not be few)."""
EXACT_ABOVE = 2.0
"""Rows whose gain off the sinks exceeds this are recomputed whole (the fast sum's error grows with the
gain; at 8 it was 1.5e-5 against the formula on inputs of scale 2, at 2 under 1.2e-5, the two passes
2.2e-6)."""
MAX_EXACT_SHARE = 0.1
"""More than this share of the rows to recompute whole: the two-pass kernel is cheaper."""


def calibrated_output(
    attention: LayerAttention,
    stored: Any,
    value: torch.Tensor,
    out: torch.Tensor,
    row_sum: torch.Tensor,
    row_lse: torch.Tensor,
    sinks: torch.Tensor,
    beta: float,
    score_scale: torch.Tensor | None = None,
    score_shift: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The calibrated output ``[batch, head, query, d]`` from one kernel pass (``out``, ``row_sum`` and
    ``row_lse`` [batch, head, query], float64) and the sink mask ``sinks`` [batch, head, key]; None when the
    two-pass kernel should run instead. ``score_scale`` / ``score_shift`` [head]: the score edit the
    pass applied."""
    query, key = stored.query, stored.key
    batch, heads, n_q, _ = query.shape
    n_k = key.shape[2]
    sinks = sinks.bool()
    counts = sinks.sum(-1)  # [batch, head]
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return out  # no sink anywhere: the edit is the identity
    if width > MAX_SINK_KEYS:
        return None
    # the sink keys of each head, first the real ones: [batch, head, width]
    index = torch.sort((~sinks).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    slot = torch.arange(width)[None, None, :] < counts[..., None]
    kv_of_head = torch.arange(heads) // (heads // key.shape[1])
    b_ix, kv_ix = torch.arange(batch)[:, None, None], kv_of_head[None, :, None]
    keys, values = key[b_ix, kv_ix, index], value[b_ix, kv_ix, index]  # [batch, head, width, d]
    scores = _edited(torch.matmul(query * stored.scaling, keys.transpose(-1, -2)), stored, score_scale, score_shift)
    positions = torch.arange(n_k - n_q, n_k)
    visible = within_reach(positions[:, None] - index[:, :, None, :], attention) & slot[:, :, None, :]
    if stored.padding is not None:
        visible &= stored.padding[b_ix, index][:, :, None, :]
    # p = exp(s - lse) in float64 (the log-sum-exp is float64: in float32 it would cost p 1e-6)
    p = torch.where(visible, torch.exp(scores.double() - row_lse[..., None]), 0.0).float()
    on_sinks = p.sum(-1)  # t [batch, head, query]
    rest = row_sum - on_sinks  # r: a difference, so rows where it is small are recomputed below
    has_rest = rest > 0
    on = torch.where(has_rest, beta, 1.0)
    off = torch.where(has_rest, 1.0 + (1.0 - beta) * on_sinks / torch.where(has_rest, rest, 1.0), 1.0)
    exact = (on_sinks > 0) & ((off > EXACT_ABOVE) | ~has_rest)
    if int(exact.sum()) > MAX_EXACT_SHARE * exact.numel():
        return None
    edited = off[..., None] * out + (on - off)[..., None] * torch.matmul(p, values)
    for b, h in exact.any(-1).nonzero().tolist():
        rows = exact[b, h].nonzero().flatten()
        edited[b, h, rows] = _rows_exactly(
            attention, stored, value, b, h, rows, row_lse[b, h, rows], sinks[b, h], beta, score_scale, score_shift
        )
    return edited


def _edited(
    scores: torch.Tensor, stored: Any, score_scale: torch.Tensor | None, score_shift: torch.Tensor | None
) -> torch.Tensor:
    """Scores ``[batch or 1, head or 1, rows, keys]`` with the softcap and the score edit, as the kernel
    applies them (head on dimension 1)."""
    if stored.softcap is not None:
        scores = torch.tanh(scores / stored.softcap) * stored.softcap
    if score_scale is not None:
        scores = scores * score_scale.view(1, -1, 1, 1).to(scores)
    if score_shift is not None:
        scores = scores + score_shift.view(1, -1, 1, 1).to(scores)
    return scores


def _rows_exactly(
    attention: LayerAttention,
    stored: Any,
    value: torch.Tensor,
    b: int,
    h: int,
    rows: torch.Tensor,
    lse: torch.Tensor,
    sinks: torch.Tensor,
    beta: float,
    score_scale: torch.Tensor | None,
    score_shift: torch.Tensor | None,
) -> torch.Tensor:
    """Calibrated output of some rows of head ``h`` of sequence ``b``, from their scores against every
    key: ``t`` and ``r`` summed directly, as the two-pass kernel sums them."""
    query, key = stored.query, stored.key
    n_q, n_k = query.shape[2], key.shape[2]
    kv = h // (query.shape[1] // key.shape[1])
    scores = (query[b, h, rows] * stored.scaling) @ key[b, kv].T  # [rows, keys]
    head = slice(h, h + 1)
    scores = _edited(
        scores[None, None],
        stored,
        None if score_scale is None else score_scale[head],
        None if score_shift is None else score_shift[head],
    )[0, 0]
    visible = within_reach((n_k - n_q + rows)[:, None] - torch.arange(n_k)[None, :], attention)
    if stored.padding is not None:
        visible &= stored.padding[b][None, :]
    p = torch.where(visible, torch.exp(scores.double() - lse[:, None]), 0.0).float()
    on_sinks = (p * sinks).sum(-1, keepdim=True)
    rest = (p * ~sinks).sum(-1, keepdim=True)
    has_rest = rest > 0
    on = torch.where(has_rest, beta, 1.0)
    off = torch.where(has_rest, 1.0 + (1.0 - beta) * on_sinks / torch.where(has_rest, rest, 1.0), 1.0)
    return (p * torch.where(sinks, on, off)) @ value[b, kv]
