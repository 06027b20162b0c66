"""What tokext knows about a loaded model: :class:`ModelInfo`, kept per model instance.

Every loader in :mod:`tokext.models.loading` registers the model it builds; bridges built
elsewhere get a record on first use (:func:`model_info`), with the attention layout read from the
wrapped Hugging Face model's config (:mod:`tokext.models.architectures`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from tokext.models.architectures import (
    AttentionLayout,
    causal_layout,
    layout_from_config,
)


@dataclass
class ModelInfo:
    """What tokext knows about a loaded model.

    ``pattern_edit_lands`` maps each layer to whether a write to its ``hook_pattern`` changes the
    logits. :func:`load_model` measures it on load (two forward passes of 8 tokens, about 0.4 s
    on SmolLM2-135M on one CPU thread); it is ``None`` for bridges built elsewhere until
    :func:`check_pattern_edits` runs. ``score_edit_lands`` is the same for ``hook_attn_scores``,
    measured lazily by :func:`check_score_edits`; ``hook_edit_lands`` the same for other hooks
    (``"blocks.{layer}.attn.hook_z"``), measured by :func:`require_hook_edits` when first needed.

    ``prepend_bos`` is whether the model's own tokenizer (the Hugging Face one, before
    TransformerLens swaps in a BOS-adding copy) puts its BOS first; tokext encodes text that way
    unless told otherwise. ``attention`` is what a query can see in each layer (causal, a sliding
    window, bidirectional, a learned sink), read from the model's config.
    """

    name: str
    source: str
    n_layers: int
    n_heads: int
    n_ctx: int
    prepend_bos: bool
    attention: AttentionLayout
    bos_token: str | None = None
    first_special: str | None = None  # a special token the tokenizer puts first without a BOS ([CLS])
    pattern_edit_lands: dict[int, bool] | None = None
    score_edit_lands: dict[int, bool] | None = None
    hook_edit_lands: dict[str, dict[int, bool]] = field(default_factory=dict)  # hook template -> layer -> lands
    notes: list[str] = field(default_factory=list)

    @property
    def bos_description(self) -> str:
        """How text is encoded by default, for tables and metadata (``"no BOS (tokenizer default)"``)."""
        if self.prepend_bos:
            return f"BOS {self.bos_token or ''} prepended (tokenizer default)".replace("  ", " ")
        if self.first_special:
            return f"no BOS, {self.first_special} first (tokenizer default)"
        return "no BOS (tokenizer default)"

    @property
    def editable(self) -> bool | None:
        """True when pattern edits reach the output in every layer, None when not yet checked."""
        if self.pattern_edit_lands is None:
            return None
        return all(self.pattern_edit_lands.values())


_INFO: weakref.WeakKeyDictionary[torch.nn.Module, ModelInfo] = weakref.WeakKeyDictionary()


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of ``model``; built on first use for bridges not loaded by tokext."""
    info = _INFO.get(model)
    if info is None:
        cfg = model.cfg
        tok = getattr(model, "tokenizer", None)
        info = ModelInfo(
            name=str(getattr(cfg, "model_name", None) or type(model).__name__),
            source="user",
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            n_ctx=int(cfg.n_ctx),
            prepend_bos=tokenizer_adds_bos(tok),
            attention=_layout_of(model),
            bos_token=getattr(tok, "bos_token", None) if tok is not None else None,
            first_special=first_special_token(tok),
        )
        _INFO[model] = info
    return info


def _layout_of(model: Any) -> AttentionLayout:
    """The attention layout of a bridge from its wrapped model's config; causal for native models."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    n_layers = int(model.cfg.n_layers)
    return layout_from_config(config, n_layers) if config is not None else causal_layout(n_layers, "native")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when encoding text by default."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def first_special_token(tokenizer: Any) -> str | None:
    """The special token ``tokenizer`` puts first by default, other than BOS (BERT's [CLS]), or None."""
    if tokenizer is None:
        return None
    ids = tokenizer("a").input_ids
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if ids and ids[0] in special and ids[0] != tokenizer.bos_token_id:
        return tokenizer.convert_ids_to_tokens(ids[0])
    return None


def register(model: Any, info: ModelInfo) -> None:
    """Remember ``info`` as what tokext knows about ``model``."""
    _INFO[model] = info
