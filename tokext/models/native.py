"""Tiny randomly initialised TransformerLens-native models: the model behind unit tests and the
trained model organism."""

from __future__ import annotations

import warnings
from typing import Any

from tokext.models.architectures import causal_layout
from tokext.models.info import ModelInfo, register


def native_model(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    n_ctx: int = 128,
    d_vocab: int = 64,
    seed: int = 0,
    name: str = "native-tiny",
    **cfg_kwargs: Any,
) -> Any:
    """A randomly initialised TransformerLens-native model (``TransformerBridge.boot_native``).

    Cheap (~0.1 s), offline and deterministic for a seed: the model behind unit tests and the
    trained model organism. It has no tokenizer; feed it token tensors.
    """
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg_kwargs.setdefault("act_fn", "gelu")
    cfg_kwargs.setdefault("normalization_type", "LN")
    cfg = TransformerBridgeConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        seed=seed,
        **cfg_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(cfg)
    model.eval()
    info = ModelInfo(
        name=name,
        source="native",
        n_layers=n_layers,
        n_heads=n_heads,
        n_ctx=n_ctx,
        prepend_bos=False,
        attention=causal_layout(n_layers),
    )
    register(model, info)
    return model
