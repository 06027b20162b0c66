"""What each query can see, built from positions, the attention mask and the layer's attention kind
(never by sniffing scores).

Shapes follow TransformerLens's ``hook_pattern``: [batch, head, query, key]. A *real* query or key
is a non-pad token. How far a query sees is the layer's
:class:`~tokext.models.architectures.LayerAttention`: every earlier key (causal, the default), the
last ``window`` keys (a sliding window, itself included), or every key (bidirectional encoders,
optionally within ``|i - k| <= window``). Windows count positions of the padded sequence, as
transformers' masks do; a padded row's real tokens are contiguous, so distances between them are
those of the row alone.

With a KV cache the queries are the last ``n_queries`` positions of the sequence so far, and a
layer's keys are its last ``n_keys`` positions: all of them for full attention, only the window for
a layer whose cache keeps a window (transformers' ``DynamicSlidingWindowLayer``).
"""

from __future__ import annotations

import torch

from tokext.models.architectures import LayerAttention

CAUSAL = LayerAttention()


def real_tokens(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Bool [batch, length]: which positions hold real tokens (all, without a mask)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return attention_mask.to(device=device).bool()


def sees(query_pos: torch.Tensor, key_pos: torch.Tensor, attention: LayerAttention = CAUSAL) -> torch.Tensor:
    """Bool [query, key]: whether a query at each of ``query_pos`` sees a key at each of ``key_pos``
    (positions only; padding is applied separately)."""
    return within_reach(query_pos[:, None] - key_pos[None, :], attention)


def within_reach(distance: torch.Tensor, attention: LayerAttention = CAUSAL) -> torch.Tensor:
    """Bool, shaped like ``distance`` (query position minus key position, any shape): whether the
    query sees the key (positions only)."""
    if attention.causal:
        ok = distance >= 0
        if attention.window is not None:
            ok &= distance < attention.window
        return ok
    if attention.window is None:
        return torch.ones_like(distance, dtype=torch.bool)
    return distance.abs() <= attention.window


def visible_keys(
    attention_mask: torch.Tensor,
    n_queries: int | None = None,
    *,
    n_keys: int | None = None,
    attention: LayerAttention = CAUSAL,
) -> torch.Tensor:
    """Bool [batch, query, key]: query sees key (within the layer's reach, both real).

    ``attention_mask`` is [batch, positions] for the whole sequence so far; the queries are its
    last ``n_queries`` positions and the keys its last ``n_keys`` (default: all, i.e. no KV cache).
    ``attention`` is the layer's kind (default causal, no window).

    >>> visible_keys(torch.tensor([[1, 1, 1]]), attention=LayerAttention(window=2)).int().tolist()
    [[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]
    """
    batch, total = attention_mask.shape
    n_queries = total if n_queries is None else n_queries
    n_keys = total if n_keys is None else n_keys
    real = attention_mask.bool()
    positions = torch.arange(total, device=real.device)
    reach = sees(positions[total - n_queries :], positions[total - n_keys :], attention)
    return reach[None] & real[:, None, total - n_keys :] & real[:, total - n_queries :, None]


def _count_real(real: torch.Tensor, below: int, above: int) -> torch.Tensor:
    """Float [batch, pos]: real positions among ``pos - below .. pos + above`` (clipped), per position."""
    batch, length = real.shape
    padded = torch.nn.functional.pad(real.to(torch.float32).cumsum(1), (1, 0))  # padded[:, j] = real in [0, j)
    pos = torch.arange(length, device=real.device)
    lo = (pos - below).clamp(0, length)
    hi = (pos + above + 1).clamp(0, length)
    return padded[:, hi] - padded[:, lo]


def visibility_counts(real: torch.Tensor, attention: LayerAttention = CAUSAL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_queries [batch, key], n_keys [batch, query])`` of an uncached, padded batch.

    ``n_queries[b, k]``: the real queries that see key k (0 on pad keys); ``n_keys[b, i]``: the real
    keys query i sees (0 on pad queries). Closed forms by cumulative sums, no [T, T] mask.
    """
    length = real.shape[1]
    wide = length  # a reach no row can exceed
    if attention.causal:
        back = wide if attention.window is None else attention.window - 1
        n_keys = _count_real(real, back, 0)
        n_queries = _count_real(real, 0, back)
    else:
        reach = wide if attention.window is None else attention.window
        n_keys = n_queries = _count_real(real, reach, reach)
    real_f = real.to(torch.float32)
    return n_queries * real_f, n_keys * real_f


def first_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Long [batch]: index of each row's first real token (its "position 0" under left padding)."""
    real = attention_mask.bool()
    return real.float().argmax(dim=1)


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Long [batch]: index of each row's last real token ([SEP] in a BERT-style input)."""
    real = attention_mask.bool()
    length = real.shape[1]
    return length - 1 - real.flip(1).float().argmax(dim=1)
