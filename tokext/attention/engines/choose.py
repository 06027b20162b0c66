"""Which engine runs a forward pass: ``engine="hooks" | "streaming" | "auto"``, resolved in one place."""

from __future__ import annotations

import difflib
from typing import Any

from tokext.errors import InputError

ENGINES = ("hooks", "streaming", "auto")
DEFAULT_BUDGET = 128 << 20
"""Bytes one layer's attention may hold at once (128 MiB): ``"auto"`` streams when one layer's eager
patterns would exceed it, and a streaming query block fits in it."""

_BYTES_EAGER = 8  # fp32 scores and probabilities are both alive in an eager layer


def check_engine(engine: str) -> str:
    """``engine`` if it names an engine, else an :class:`InputError` listing them."""
    if engine not in ENGINES:
        close = difflib.get_close_matches(str(engine), ENGINES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown engine {engine!r}.{hint} Choose from {', '.join(ENGINES)}")
    return engine


def eager_bytes(model: Any, batch: int, length: int) -> int:
    """Bytes of one layer's eager attention (scores and pattern) for ``batch`` sequences of ``length``."""
    return batch * int(model.cfg.n_heads) * length * length * _BYTES_EAGER


def choose_engine(model: Any, engine: str = "hooks", *, batch: int = 1, length: int = 1,
                  budget: int = DEFAULT_BUDGET) -> str:
    """``"hooks"`` or ``"streaming"``: ``engine`` itself, or for ``"auto"`` streaming exactly when one
    layer's eager patterns for ``batch`` x ``length`` would exceed ``budget`` bytes.

    >>> from tokext.models import native_model
    >>> choose_engine(native_model(), "auto", batch=1, length=16)
    'hooks'
    """
    check_engine(engine)
    if engine != "auto":
        return engine
    return "streaming" if eager_bytes(model, batch, length) > budget else "hooks"
