"""Does an edit of the attention reach the logits? Measured per layer on a short probe.

TransformerLens adapters that rebuild attention (Llama, GPT-2, ...) apply a write to
``hook_pattern``; delegating adapters (OPT, GPT-J, BERT, ...) fire the hook after the model used
the weights, and discard the write. :func:`check_pattern_edits` measures which case a model is in
(cached in :class:`tokext.models.info.ModelInfo`), :func:`require_pattern_edits` refuses the rest.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tokext.errors import UneditableAttentionError
from tokext.models.devices import input_device
from tokext.models.hooks import attached
from tokext.models.info import model_info


def check_pattern_edits(model: Any, *, tol: float = 1e-4) -> dict[int, bool]:
    """Measure, per layer, whether replacing ``hook_pattern`` changes the logits; cache the answer.

    Each layer's pattern is replaced by uniform causal attention in a short forward pass; a
    "discarded" UserWarning from TransformerLens or a max |delta logit| below ``tol`` marks
    the layer as not editable. Layers of the same attention class share one measurement.
    """
    info = model_info(model)
    if info.pattern_edit_lands is None:
        info.pattern_edit_lands = _check_edits(model, "hook_pattern", _uniform_pattern, tol)
    return info.pattern_edit_lands


def check_score_edits(model: Any, *, tol: float = 1e-4) -> dict[int, bool]:
    """Like :func:`check_pattern_edits` for the pre-softmax ``hook_attn_scores``: per layer,
    whether replacing the scores changes the logits (it does not on TransformerLens-native models
    and delegating adapters). Cached; interventions that are exact pre-softmax use it to pick the
    cheaper hook."""
    info = model_info(model)
    if info.score_edit_lands is None:
        info.score_edit_lands = _check_edits(model, "hook_attn_scores", _flat_scores, tol)
    return info.score_edit_lands


def _uniform_pattern(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    causal = torch.ones_like(pattern).tril()
    return causal / causal.sum(-1, keepdim=True)


def _flat_scores(scores: torch.Tensor, hook: Any) -> torch.Tensor:
    visible = scores > torch.finfo(scores.dtype).min / 2  # masked entries are -inf or the dtype's minimum
    return torch.where(visible, torch.zeros_like(scores), scores)


@contextmanager
def _other_hooks_suspended(model: Any) -> Iterator[None]:
    """Detach every non-permanent hook for the duration of a probe, then restore them in order.

    A probe can run while the caller's hooks are attached (a check made lazily inside an
    ``intervene`` block, a user's ``model.hooks``): they must neither fire on the probe nor
    change what it measures. TransformerLens's permanent hooks belong to the model and stay.
    """
    saved = []
    for point in getattr(model, "hook_dict", {}).values():
        foreign = {handle.hook.id for handle in point.fwd_hooks if not handle.is_permanent}
        if foreign:
            original = point._forward_hooks
            point._forward_hooks = OrderedDict((k, v) for k, v in original.items() if k not in foreign)
            saved.append((point, original))
    try:
        yield
    finally:
        for point, original in saved:
            point._forward_hooks = original


def _check_edits(model: Any, hook: str, edit: Any, tol: float) -> dict[int, bool]:
    """Per layer: does ``edit`` at ``blocks.{layer}.attn.{hook}`` move the logits of a short probe?"""
    with _other_hooks_suspended(model):
        return _probe_edits(model, "blocks.{layer}.attn." + hook, edit, tol)


def _probe_edits(model: Any, template: str, edit: Any, tol: float) -> dict[int, bool]:
    info = model_info(model)
    vocab = int(model.cfg.d_vocab)
    n = min(8, int(model.cfg.n_ctx))
    tokens = (torch.arange(n, device=_device(model)) * 7 + 3) % vocab
    tokens = tokens[None]
    by_class: dict[type, bool] = {}
    lands: dict[int, bool] = {}
    with torch.no_grad():
        base = model(tokens)
        for layer in range(info.n_layers):
            cls = type(model.blocks[layer].attn)
            if cls not in by_class:
                by_class[cls] = _edit_changes_logits(model, tokens, base, template.format(layer=layer), edit, tol)
            lands[layer] = by_class[cls]
    return lands


def _edit_changes_logits(
    model: Any, tokens: torch.Tensor, base: torch.Tensor, name: str, edit: Any, tol: float
) -> bool:
    if name not in getattr(model, "hook_dict", {}):
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attached(model, [(name, edit)]):
            edited = model(tokens)
    discarded = any("discard" in str(w.message).lower() for w in caught)
    return (not discarded) and float((edited - base).abs().max()) > tol


def require_pattern_edits(model: Any, layers: list[int] | None = None) -> None:
    """Raise :class:`UneditableAttentionError` unless ``hook_pattern`` edits reach the logits."""
    lands = check_pattern_edits(model)
    bad = [layer for layer in (layers if layers is not None else lands) if not lands.get(layer, False)]
    if bad:
        info = model_info(model)
        cls = type(model.blocks[bad[0]].attn).__name__
        raise UneditableAttentionError(
            f"{info.name}: writes to hook_pattern do not reach the logits in layers {bad} "
            f"({info.attention.family}'s attention bridge {cls} runs attention itself and fires the hook afterwards). "
            "Pattern interventions cannot work on this model; use a model whose TransformerLens "
            "adapter rebuilds attention (Llama, Mistral, Qwen, GPT-2, ...)."
        )


def _zeros(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(tensor)


def require_hook_edits(model: Any, template: str, layers: list[int], *, tol: float = 1e-4) -> None:
    """Raise :class:`UneditableAttentionError` unless zeroing the hook ``template.format(layer=l)``
    (e.g. ``"blocks.{layer}.attn.hook_z"``) changes the logits in each of ``layers``.

    Measured once per model and template on a short probe (layers of one attention class share one
    measurement) and cached in :class:`tokext.models.info.ModelInfo`. A hook point the model lacks
    does not land.
    """
    info = model_info(model)
    cache = info.hook_edit_lands
    if template not in cache:
        with _other_hooks_suspended(model):
            cache[template] = _probe_edits(model, template, _zeros, tol)
    lands = cache[template]
    bad = [layer for layer in layers if not lands.get(layer, False)]
    if bad:
        name = template.format(layer=bad[0])
        raise UneditableAttentionError(
            f"{info.name}: writes to {name} (and the same hook of layers {bad}) do not reach the logits "
            f"({info.attention.family}'s TransformerLens adapter runs that part of the model itself): "
            "this intervention cannot work on this model"
        )


def _device(model: Any) -> torch.device:
    return input_device(model)
