"""What tokext knows about a loaded model: :class:`ModelInfo`, kept per model instance.

Every loader in :mod:`tokext.models.loading` registers the model it builds; bridges built
elsewhere get a record on first use (:func:`model_info`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelInfo:
    """What tokext knows about a loaded model.

    ``pattern_edit_lands`` maps each layer to whether a write to its ``hook_pattern`` changes the
    logits. :func:`load_model` measures it on load (two forward passes of 8 tokens, about 0.4 s
    on SmolLM2-135M on one CPU thread); it is ``None`` for bridges built elsewhere until
    :func:`check_pattern_edits` runs. ``score_edit_lands`` is the same for ``hook_attn_scores``,
    measured lazily by :func:`check_score_edits`.
    """

    name: str
    source: str
    n_layers: int
    n_heads: int
    n_ctx: int
    prepend_bos: bool
    pattern_edit_lands: dict[int, bool] | None = None
    score_edit_lands: dict[int, bool] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def editable(self) -> bool | None:
        """True when pattern edits reach the output in every layer, None when not yet checked."""
        if self.pattern_edit_lands is None:
            return None
        return all(self.pattern_edit_lands.values())


_INFO: "weakref.WeakKeyDictionary[torch.nn.Module, ModelInfo]" = weakref.WeakKeyDictionary()


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
        )
        _INFO[model] = info
    return info


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when encoding text by default."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def register(model: Any, info: ModelInfo) -> None:
    """Remember ``info`` as what tokext knows about ``model``."""
    _INFO[model] = info
