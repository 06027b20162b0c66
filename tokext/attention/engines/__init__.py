"""Attention engines: how a forward pass computes attention while tokext reads and edits it.

- ``"hooks"`` (the default): TransformerLens's eager attention. Every layer's full
  ``[batch, head, query, key]`` pattern passes through ``hook_pattern``, where statistics are
  read and interventions edit it; a user's own hooks see it too. Memory grows as T^2 per layer.
- ``"streaming"`` (:mod:`tokext.attention.engines.streaming`): the model's own attention code
  (transformers') runs with an attention function that computes one block of query rows at a time,
  folds it into the statistics, applies the interventions and multiplies by the values, so no
  [T, T] pattern is ever held. Same numbers as the hook engine (tested to 1e-5).
- ``"auto"``: streaming when one layer's eager patterns would not fit in the memory budget.

May import: :mod:`tokext.models` and the rest of :mod:`tokext.attention`.
"""

from __future__ import annotations

from tokext.attention.engines.choose import DEFAULT_BUDGET, ENGINES, choose_engine

__all__ = ["DEFAULT_BUDGET", "ENGINES", "choose_engine"]
