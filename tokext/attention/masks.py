"""Causal and padding masks, built from positions and the attention mask (never by sniffing scores).

Shapes follow TransformerLens's ``hook_pattern``: [batch, head, query, key]. A *real* query or key
is a non-pad token. Query ``q`` of a batch row sees key ``k`` when both are real and ``k`` is not
after ``q``. ``past_len`` keys precede the queries when a KV cache is in use.
"""

from __future__ import annotations

import torch


def real_tokens(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Bool [batch, length]: which positions hold real tokens (all, without a mask)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return attention_mask.to(device=device).bool()


def visible_keys(attention_mask: torch.Tensor, n_queries: int | None = None) -> torch.Tensor:
    """Bool [batch, query, key]: query sees key (causal, both real).

    ``attention_mask`` is [batch, keys]; the queries are the last ``n_queries`` positions
    (default: all keys, i.e. no KV cache).
    """
    batch, n_keys = attention_mask.shape
    n_queries = n_keys if n_queries is None else n_queries
    real = attention_mask.bool()
    key_pos = torch.arange(n_keys, device=real.device)
    query_pos = key_pos[n_keys - n_queries:]
    causal = key_pos[None, :] <= query_pos[:, None]  # [query, key]
    return causal[None] & real[:, None, :] & real[:, n_keys - n_queries:, None]


def first_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Long [batch]: index of each row's first real token (its "position 0" under left padding)."""
    real = attention_mask.bool()
    return real.float().argmax(dim=1)


def self_key_mask(attention_mask: torch.Tensor, n_queries: int | None = None) -> torch.Tensor:
    """Bool [1, query, key]: the key at the query's own absolute position (the diagonal of D)."""
    n_keys = attention_mask.shape[1]
    n_queries = n_keys if n_queries is None else n_queries
    key_pos = torch.arange(n_keys, device=attention_mask.device)
    query_pos = key_pos[n_keys - n_queries:]
    return (key_pos[None, :] == query_pos[:, None])[None]
