"""Run a model over a dataset with streaming statistics attached to every ``hook_pattern``.

Batches are right-padded (real queries never see pad keys; positions stay those of a lone run)
and sorted by length. Pad query rows and pad keys are excluded from every statistic, so a padded
batch gives the statistics of one-by-one runs.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from tokext.models.devices import input_device
from tokext.models.hooks import attached, pattern_hook_name, resolve_layers
from tokext.models.inputs import Inputs, batches, encode, pad_id
from tokext.attention.metrics import CATEGORIES, token_category
from tokext.models.info import model_info
from tokext.attention.stats import AttentionStats, BatchContext

_CATEGORY_TABLES: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def category_table(model: Any, tokenizer: Any = None) -> torch.Tensor:
    """Long [vocab]: category of every token id (indices into :data:`tokext.attention.metrics.CATEGORIES`).

    Each id is decoded on its own and classified by :func:`tokext.attention.metrics.token_category`, so a
    byte-level ``"Ċ"`` counts as whitespace; the tokenizer's special tokens (BOS, EOS, pad) are
    ``"other"``, and every id is ``"other"`` for a model without a tokenizer. The ``"first"``
    category is given per sequence by :func:`batch_context`. Cached per tokenizer (or model).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    key = tokenizer if tokenizer is not None else model
    table = _CATEGORY_TABLES.get(key) if _weakrefable(key) else None
    if table is not None:
        return table
    vocab = int(model.cfg.d_vocab)
    other = CATEGORIES.index("other")
    if tokenizer is None:
        table = torch.full((vocab,), other, dtype=torch.long)
    else:
        texts = tokenizer.batch_decode([[i] for i in range(vocab)]) if hasattr(tokenizer, "batch_decode") \
            else [tokenizer.decode([i]) for i in range(vocab)]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        table = torch.tensor([other if i in special else token_category(t) for i, t in enumerate(texts)],
                             dtype=torch.long)
    if _weakrefable(key):
        _CATEGORY_TABLES[key] = table
    return table


def _weakrefable(obj: Any) -> bool:
    """Whether ``obj`` can key the cache (weak-referenceable and hashable)."""
    try:
        weakref.ref(obj)
        hash(obj)
        return True
    except TypeError:
        return False


def batch_context(tokens: torch.Tensor, attention_mask: torch.Tensor, sequence_ids: Sequence[int],
                  table: torch.Tensor) -> BatchContext:
    """Masks, counts and token categories of one right- or left-padded batch.

    ``categories`` is ``table[tokens]`` except at each row's first real token (its BOS when the
    tokenizer adds one), which gets the ``"first"`` category whatever its text.
    """
    real = attention_mask.bool()
    real_f = real.to(torch.float32)
    # real queries at or after k that see k: suffix sum of real rows, zero on pad keys
    n_queries = real_f.flip(1).cumsum(1).flip(1) * real_f
    n_keys = real_f.cumsum(1) * real_f
    categories = table.to(tokens.device)[tokens]
    first = real_f.argmax(1)
    categories[torch.arange(tokens.shape[0], device=tokens.device), first] = CATEGORIES.index("first")
    return BatchContext(real=real, categories=categories, tokens=tokens,
                        sequence_ids=torch.as_tensor(list(sequence_ids), device=tokens.device),
                        n_queries=n_queries, n_keys=n_keys)


def collect_attention_stats(
    model: Any,
    inputs: Inputs,
    *,
    batch_size: int = 8,
    layers: int | Sequence[int] | None = None,
    max_len: int | None = None,
    prepend_bos: bool | None = None,
    tokenizer: Any = None,
    sink_floor: float = 0.05,
    progress: bool = True,
    dataset: str | None = None,
) -> AttentionStats:
    """Attention statistics of ``model`` over ``inputs``, reduced inside the hooks.

    ``inputs``: list of strings, a [n, pos] token tensor, or lists of token ids. ``layers``: which
    layers to measure (default all). ``max_len`` cuts each sequence to its first tokens (Gu et al.
    use 64). ``tokenizer`` overrides the model's for token categories (e.g. the model organism's).
    Memory is O(layers x heads x positions) plus one layer's pattern at a time.

    >>> from tokext.models import native_model
    >>> model = native_model()
    >>> stats = collect_attention_stats(model, torch.randint(0, 64, (3, 12)), progress=False)
    >>> stats.entropy.shape
    (2, 4)
    """
    chosen = resolve_layers(model, layers)
    seqs = encode(model, inputs, max_len=max_len, prepend_bos=prepend_bos)
    info = model_info(model)
    device = input_device(model)
    table = category_table(model, tokenizer)
    stats = AttentionStats(
        layers=chosen, n_heads=info.n_heads, sink_floor=sink_floor,
        metadata={"model": info.name, "source": info.source, "n_inputs": len(seqs),
                  "max_len": max_len, "prepend_bos": info.prepend_bos if prepend_bos is None else prepend_bos,
                  "lengths": [int(s.numel()) for s in seqs], "dataset": dataset, "batch_size": batch_size},
    )
    stats.start(device)

    def make_hook(layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            stats.update(layer, pattern)
        return hook

    hooks = [(pattern_hook_name(layer), make_hook(layer)) for layer in chosen]
    pad = pad_id(model)
    all_batches = list(batches(seqs, batch_size, pad))
    with attached(model, hooks), torch.inference_mode():
        for batch in tqdm(all_batches, desc="attention stats", disable=not progress, unit="batch"):
            tokens = batch.tokens.to(device)
            mask = batch.attention_mask.to(device)
            stats.begin_batch(batch_context(tokens, mask, batch.indices, table))
            model(tokens, attention_mask=mask, return_type=None)
    decoder = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    decode = (lambda t: decoder.decode([t])) if decoder is not None else None
    return stats.finish(decode)
