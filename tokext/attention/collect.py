"""Run a model over a dataset with streaming statistics attached to every ``hook_pattern``.

Batches are right-padded (real queries never see pad keys; positions stay those of a lone run)
and sorted by length. Pad query rows and pad keys are excluded from every statistic, so a padded
batch gives the statistics of one-by-one runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from tokext.attention.engines.choose import DEFAULT_BUDGET, choose_engine
from tokext.attention.engines.streaming import BlockGeometry, LayerChain, active_engine, streaming
from tokext.attention.masks import first_real_position, last_real_position
from tokext.attention.metrics import CATEGORIES, token_category
from tokext.attention.norm_sources import NormPlan, feeding_norms, plan_norms, streaming_kv
from tokext.attention.norms import NormStats
from tokext.attention.positions import PositionProfile, check_bins
from tokext.attention.protocols import Protocol, resolve_protocol
from tokext.attention.stats import AttentionStats, BatchContext
from tokext.errors import InputError
from tokext.models.devices import input_device
from tokext.models.hooks import attached, pattern_hook_name, resolve_layers
from tokext.models.info import model_info
from tokext.models.inputs import Inputs, batches, bos_policy, encode, pad_id

_CATEGORY_TABLES: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


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
        texts = (
            tokenizer.batch_decode([[i] for i in range(vocab)])
            if hasattr(tokenizer, "batch_decode")
            else [tokenizer.decode([i]) for i in range(vocab)]
        )
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        table = torch.tensor(
            [other if i in special else token_category(t) for i, t in enumerate(texts)], dtype=torch.long
        )
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


def batch_context(
    tokens: torch.Tensor, attention_mask: torch.Tensor, sequence_ids: Sequence[int], table: torch.Tensor
) -> BatchContext:
    """Token categories and real positions of one right- or left-padded batch (the counts of what
    each query sees are computed per layer kind by :meth:`BatchContext.counts`).

    ``categories`` is ``table[tokens]`` except at each row's first real token (its BOS, or [CLS],
    when the tokenizer adds one), which gets the ``"first"`` category whatever its text.
    """
    real = attention_mask.bool()
    categories = table.to(tokens.device)[tokens]
    first = first_real_position(real)
    categories[torch.arange(tokens.shape[0], device=tokens.device), first] = CATEGORIES.index("first")
    return BatchContext(
        real=real,
        categories=categories,
        tokens=tokens,
        sequence_ids=torch.as_tensor(list(sequence_ids), device=tokens.device),
        last=last_real_position(real),
    )


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
    protocol: str | None = None,
    engine: str = "hooks",
    budget: int = DEFAULT_BUDGET,
    position_bins: Sequence[int] | None = None,
    norms: bool = False,
) -> AttentionStats:
    """Attention statistics of ``model`` over ``inputs``, reduced inside the hooks.

    ``inputs``: list of strings, a [n, pos] token tensor, or lists of token ids. ``layers``: which
    layers to measure (default all). ``max_len`` cuts each sequence to its first tokens.
    ``prepend_bos``: ``None`` encodes text as the model's own tokenizer does (recorded in the
    metadata as ``bos``). ``tokenizer`` overrides the model's for token categories (e.g. the
    model organism's). ``protocol="gu2024"`` measures as Gu et al. 2024 did (first 64 tokens,
    shorter inputs refused, the tokenizer's own BOS default, sink rate thresholded per sequence;
    see :mod:`tokext.attention.protocols`). What each query sees comes from the model's layers
    (:attr:`tokext.models.info.ModelInfo.attention`). Memory is O(layers x heads x positions) plus
    one layer's pattern at a time with ``engine="hooks"``, one block of query rows at a time with
    ``engine="streaming"`` (same numbers; ``"auto"`` picks streaming when one layer's patterns of a
    batch would exceed ``budget`` bytes). Inside a streaming ``intervene`` block the statistics join
    its engine and see the edited blocks, as the hook engine's statistics see edited patterns.
    ``position_bins`` (edges of query positions, e.g. :func:`~tokext.attention.positions.log_position_bins`)
    also resolves first-token mass and entropy by query position (``stats.by_position``).
    ``norms=True`` also collects key, value, head-output and residual norms, norm-weighted received
    attention and massive activations in the same pass (:mod:`tokext.attention.norms`; where each is
    read: :mod:`tokext.attention.norm_sources`).

    >>> from tokext.models import native_model
    >>> model = native_model()
    >>> stats = collect_attention_stats(model, torch.randint(0, 64, (3, 12)), progress=False)
    >>> stats.entropy.shape
    (2, 4)
    """
    chosen = resolve_layers(model, layers)
    rules = resolve_protocol(protocol)
    if rules is not None:
        max_len = _protocol_length(rules, max_len, prepend_bos)
    seqs = encode(model, inputs, max_len=max_len, prepend_bos=prepend_bos)
    if rules is not None:
        _refuse_short(rules, seqs)
    info = model_info(model)
    device = input_device(model)
    table = category_table(model, tokenizer)
    stats = AttentionStats(
        layers=chosen,
        n_heads=info.n_heads,
        sink_floor=sink_floor,
        metadata={
            "model": info.name,
            "source": info.source,
            "n_inputs": len(seqs),
            "max_len": max_len,
            "prepend_bos": info.prepend_bos if prepend_bos is None else prepend_bos,
            "bos": bos_policy(model, prepend_bos),
            "protocol": rules.name if rules else "default",
            "family": info.attention.family,
            "encoder": info.attention.encoder,
            "cls_token": getattr(getattr(model, "tokenizer", None), "cls_token", None),
            "sep_token": getattr(getattr(model, "tokenizer", None), "sep_token", None),
            "lengths": [int(s.numel()) for s in seqs],
            "dataset": dataset,
            "batch_size": batch_size,
        },
        by_position=None
        if position_bins is None
        else PositionProfile(edges=check_bins(position_bins), n_layers=len(chosen), n_heads=info.n_heads),
    )
    longest = max(int(s.numel()) for s in seqs)
    which = (
        "streaming"
        if active_engine(model) is not None
        else choose_engine(model, engine, batch=min(batch_size, len(seqs)), length=longest, budget=budget)
    )
    plan = plan_norms(model, chosen, which) if norms else None  # every source checked before any work
    stats.start(device, [info.attention[layer] for layer in chosen])
    if plan is not None:
        stats.norms = NormStats(chosen, info.n_heads)
        stats.norms.start(device, plan.factors)
    stats.metadata["engine"] = which
    stats.metadata["norms"] = bool(norms)
    pad = pad_id(model)
    all_batches = list(batches(seqs, batch_size, pad))
    no_logits = last_logits_only(model)
    with _observing(model, stats, chosen, which, budget, plan), torch.inference_mode():
        for batch in tqdm(all_batches, desc="attention stats", disable=not progress, unit="batch"):
            tokens = batch.tokens.to(device)
            mask = batch.attention_mask.to(device)
            stats.begin_batch(batch_context(tokens, mask, batch.indices, table))
            model(tokens, attention_mask=mask, return_type=None, **no_logits)
    decoder = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    decode = (lambda t: decoder.decode([t])) if decoder is not None else None
    return stats.finish(decode)


def last_logits_only(model: Any) -> dict[str, int]:
    """Forward kwargs that skip the unembedding of every position but the last, where the wrapped
    model takes them (``logits_to_keep``): statistics need no logits, and at long context the full
    logits (positions x vocabulary) cost more memory than all the attention."""
    import inspect

    forward = getattr(getattr(model, "original_model", None), "forward", None)
    try:
        return (
            {"logits_to_keep": 1}
            if forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
            else {}
        )
    except (TypeError, ValueError):
        return {}


@contextlib.contextmanager
def _observing(
    model: Any, stats: AttentionStats, layers: Sequence[int], engine: str, budget: int, plan: NormPlan | None
) -> Iterator[None]:
    """The statistics fed by hooks on ``hook_pattern`` or, streaming, by the engine's blocks; with a
    norm plan, the norm statistics' own sources too."""
    with _attention_feed(model, stats, layers, engine, budget, plan is not None):
        if plan is None:
            yield
        else:
            with feeding_norms(model, stats, plan):
                yield


def _attention_feed(
    model: Any, stats: AttentionStats, layers: Sequence[int], engine: str, budget: int, kv: bool
) -> Any:
    if engine == "hooks":

        def make_hook(layer: int) -> Callable:
            def hook(pattern: torch.Tensor, hook: Any) -> None:
                stats.update(layer, pattern)

            return hook

        return attached(model, [(pattern_hook_name(layer), make_hook(layer)) for layer in layers])

    def observer(layer: int) -> LayerChain:
        def observe(block: torch.Tensor, geometry: BlockGeometry, plogp: torch.Tensor | None) -> None:
            stats.update_block(layer, block, geometry.q_start, geometry.k_start, plogp=plogp)

        observe.fused = _ReducedStatistics(stats, layer)  # type: ignore[attr-defined]
        return LayerChain(
            observers=[observe], finish=[lambda: stats.end_layer(layer)], kv=streaming_kv(stats, layer).kv if kv else []
        )

    return streaming(model, {layer: observer(layer) for layer in layers}, budget=budget)


class _ReducedStatistics:
    """A layer's statistics taken already reduced from the streaming engine's fused kernel
    (:mod:`tokext.attention.engines.fused`): the row weights and probe column it needs, and the sums."""

    def __init__(self, stats: AttentionStats, layer: int):
        self.stats, self.layer = stats, layer

    def request(self, n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.stats.fused_request(n_rows, device)

    def take(self, column_sum, row_sum, plogp, probe, geometry: BlockGeometry) -> None:
        self.stats.update_reduced(self.layer, column_sum, row_sum, plogp, probe, geometry.q_start, geometry.k_start)


def _protocol_length(rules: Protocol, max_len: int | None, prepend_bos: bool | None) -> int:
    """The protocol's input length, refusing settings it fixes otherwise."""
    if max_len not in (None, rules.length):
        raise InputError(
            f"protocol {rules.name!r} cuts every input to its first {rules.length} tokens: drop max_len={max_len}"
        )
    if prepend_bos is not None:
        raise InputError(
            f"protocol {rules.name!r} keeps the tokenizer's own BOS default: drop prepend_bos={prepend_bos}"
        )
    return rules.length


def _refuse_short(rules: Protocol, seqs: Sequence[torch.Tensor]) -> None:
    short = [(i, int(s.numel())) for i, s in enumerate(seqs) if s.numel() < rules.length]
    if short:
        shown = ", ".join(f"input {i} ({n} tokens)" for i, n in short[:5]) + (", ..." if len(short) > 5 else "")
        raise InputError(
            f"protocol {rules.name!r} needs inputs of at least {rules.length} tokens; "
            f"{len(short)} of {len(seqs)} are shorter: {shown}"
        )
