"""Attention metrics as pure functions of a pattern and its visibility mask. No model, no hooks.

The public API for a pattern tensor you already have (exported as ``tokext.received_attention``,
``tokext.row_entropy``, ``tokext.category_mass``, ``tokext.learned_sink_share``,
``tokext.sink_rate``, ``tokext.hidden_sink_mask``, ``tokext.token_category`` and
``tokext.visible_keys``)::

    visible = tokext.visible_keys(attention_mask)          # [batch, query, key]
    alpha = tokext.received_attention(pattern, visible)    # [batch, head, key]
    tokext.sink_rate(alpha[..., 0])                        # % of (sequence, head) with alpha_0 > 0.3

:func:`tokext.collect_attention_stats` computes the same quantities streaming, inside hooks.

``pattern`` is post-softmax attention [batch, head, query, key] (TransformerLens ``hook_pattern``);
``visible`` is Bool [batch, query, key] (see :func:`tokext.attention.masks.visible_keys`, which
knows sliding windows and encoders). Each row is read as a distribution:

- without a learned sink, rows are renormalised over their visible keys, so edited patterns whose
  rows no longer sum to 1 (early-layer emulation) are measured as distributions;
- with ``learned_sink=True`` (gpt-oss) the row's distribution is its visible keys plus the sink,
  whose share is ``s_i = 1 - sum_j p_ij``: weights are taken as the model uses them (a row edited
  to sum above 1 is renormalised with ``s_i = 0``).

Definitions follow Gu et al. 2024 (received attention, sink rate), ACT (hidden sinks) and the
Active-Dormant entropy convention, with one-outcome rows left out of the entropy.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import torch
from einops import einsum

from tokext.errors import InputError

CATEGORIES = ("first", "punctuation", "whitespace", "digit", "other")
"""Token categories for attention mass: each row's first real token, then by the token's text."""


def _distribution(
    pattern: torch.Tensor, visible: torch.Tensor, learned_sink: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, s)``: each row over its visible keys ``p`` [batch, head, query, key] and the learned
    sink's share ``s`` [batch, head, query] (0 without a sink), summing to 1 (0 for empty rows)."""
    if not isinstance(pattern, torch.Tensor) or pattern.ndim != 4:
        raise InputError(f"pattern must be a [batch, head, query, key] tensor, got {_shape(pattern)}")
    if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool or visible.ndim != 3:
        raise InputError(f"visible must be a Bool [batch, query, key] tensor, got {_shape(visible)}")
    batch, _, queries, keys = pattern.shape
    if visible.shape[0] not in (1, batch) or tuple(visible.shape[1:]) != (queries, keys):
        raise InputError(
            f"visible {tuple(visible.shape)} does not match pattern {tuple(pattern.shape)} "
            "(expected [batch or 1, query, key])"
        )
    masked = pattern * visible[:, None]
    row = masked.sum(-1)
    if learned_sink:
        has_keys = visible.any(-1)[:, None]  # rows with no visible key (pad queries) stay empty
        total = torch.where(has_keys, row.clamp_min(1.0), torch.zeros_like(row))
    else:
        total = row
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return masked / safe[..., None], (total - row).clamp_min(0.0) / safe


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def received_attention(pattern: torch.Tensor, visible: torch.Tensor, learned_sink: bool = False) -> torch.Tensor:
    """alpha_k [batch, head, key]: mean attention key k receives from the real queries that see it.

    Divides by the number of such queries (T - k for an unpadded causal row, 0-indexed; the
    queries within the window for a sliding-window layer; every real query for an encoder), as
    Gu et al. and ACT do. Keys no real query sees (padding) are NaN.
    """
    p, _ = _distribution(pattern, visible, learned_sink)
    column_sum = einsum(p, "batch head query key -> batch head key")
    n_queries = visible.sum(1).to(p.dtype)  # [batch, key]
    return column_sum / torch.where(n_queries > 0, n_queries, torch.full_like(n_queries, float("nan")))[:, None]


def row_entropy(pattern: torch.Tensor, visible: torch.Tensor, learned_sink: bool = False) -> torch.Tensor:
    """Normalised entropy [batch, head, query] of each row: H_i / log(number of outcomes).

    The outcomes are the visible keys, plus the sink with ``learned_sink=True``. 1 is uniform,
    0 is one-hot. Rows with fewer than two outcomes are NaN.
    """
    p, s = _distribution(pattern, visible, learned_sink)
    entropy = -torch.special.xlogy(p, p).sum(-1) - torch.special.xlogy(s, s)
    n_keys = visible.sum(-1).to(p.dtype)[:, None] + (1.0 if learned_sink else 0.0)  # [batch, 1, query]
    log_n = torch.log(n_keys)
    return torch.where(
        n_keys >= 2,
        entropy / torch.where(n_keys >= 2, log_n, torch.ones_like(log_n)),
        torch.full_like(entropy, float("nan")),
    )


def category_mass(
    pattern: torch.Tensor,
    visible: torch.Tensor,
    categories: torch.Tensor,
    n_categories: int = len(CATEGORIES),
    learned_sink: bool = False,
) -> torch.Tensor:
    """Share of each row's mass per token category [batch, head, query, category].

    ``categories`` is Long [batch, key] (indices into :data:`CATEGORIES`). Rows of pad queries are 0.
    With ``learned_sink=True`` a row's categories sum to ``1 - s_i``.
    """
    p, _ = _distribution(pattern, visible, learned_sink)
    onehot = torch.nn.functional.one_hot(categories, n_categories).to(p.dtype)
    return einsum(p, onehot, "batch head query key, batch key category -> batch head query category")


def learned_sink_share(pattern: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """s_i [batch, head, query]: the learned sink's share of each row, ``1 - sum_j p_ij`` (gpt-oss).

    0 on rows that sum to 1 or more, and on rows with no visible key (pad queries).
    """
    return _distribution(pattern, visible, learned_sink=True)[1]


def sink_rate(received: torch.Tensor | Any, eps: float = 0.3) -> float:
    """Gu et al.'s Sink^eps: percentage of entries (e.g. (layer, head) pairs) with alpha_k > eps.

    ``received`` is a tensor or array of alpha values (e.g. ``received_attention(...)[..., 0]``);
    NaN entries (positions no query saw) are left out; NaN when nothing is left.
    """
    values = torch.as_tensor(received, dtype=torch.float64)
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return float("nan")
    return float(100.0 * (values > eps).double().mean())


def hidden_sink_mask(received: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """ACT's hidden sinks: Bool like ``received`` [..., key], True at keys with alpha_k > tau except the
    first such key, which ACT keeps as the attention sink (normally k = 0, the initial token).

    >>> hidden_sink_mask(torch.tensor([[0.5, 0.05, 0.2], [0.05, 0.3, 0.2]])).tolist()
    [[False, False, True], [False, False, True]]
    """
    above = received > tau
    first = above.to(torch.int8).argmax(-1, keepdim=True)  # the first index above tau (0 if none)
    kept = torch.zeros_like(above).scatter_(-1, first, True)
    return above & ~kept


def token_category(text: str) -> int:
    r"""Category index into :data:`CATEGORIES` of a token's *decoded* text.

    Leading and trailing whitespace is ignored, then: nothing left is ``"whitespace"`` (``" "``,
    ``"\n"``, ``"\t"``, ``"\n\n"``); only digits is ``"digit"`` (``"7"``, ``" 42"``); only
    Unicode punctuation or symbols is ``"punctuation"`` (``","``, ``"?!"``, ``"$"``); anything
    else, including a byte-level fragment of a multi-byte character (decoded as U+FFFD), is
    ``"other"``. Pass decoded text: a byte-level vocabulary entry such as ``"Ċ"`` (GPT-2's
    spelling of a newline) is a letter until decoded. The ``"first"`` category is not decided
    here: the collector gives it to each sequence's first real token, whatever its text, and
    special tokens elsewhere count as ``"other"`` (see :func:`tokext.attention.collect.category_table`).
    """
    stripped = text.strip()
    if not stripped:
        return CATEGORIES.index("whitespace")
    if "\ufffd" in stripped:
        return CATEGORIES.index("other")
    if stripped.isdigit():
        return CATEGORIES.index("digit")
    if all(unicodedata.category(ch).startswith(("P", "S")) for ch in stripped):
        return CATEGORIES.index("punctuation")
    return CATEGORIES.index("other")
