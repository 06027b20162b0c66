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
_BYTES_STREAMING = 16  # fp32 scores, probabilities and two temporaries of a streaming block


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


def choose_engine(
    model: Any, engine: str = "hooks", *, batch: int = 1, length: int = 1, budget: int = DEFAULT_BUDGET
) -> str:
    """``"hooks"`` or ``"streaming"``: ``engine`` itself, or for ``"auto"`` streaming exactly when one
    layer's eager patterns for ``batch`` x ``length`` would exceed ``budget`` bytes.

    >>> from tokext.models import native_model
    >>> choose_engine(native_model(), "auto", batch=1, length=16)
    'hooks'
    """
    check_engine(engine)
    if engine == "auto":
        engine = "streaming" if eager_bytes(model, batch, length) > budget else "hooks"
    if engine == "streaming":
        block_rows(model, batch, length, budget)  # a budget too small for one row fails here, before any work
    return engine


PREFERRED_BLOCK_ENTRIES = 1 << 22
"""Entries (batch x heads x rows x keys) of a block when memory allows. Measured with statistics on
SmolLM2-135M (9 heads), 2 CPU threads, after a warm-up: 32 to 256 rows at 2,048 keys and 56 to 126
rows at 8,192 were within noise (about 5%); blocks much larger than this leave the caches, and
much smaller ones pay a fixed cost per block (plain engine, 8,192 keys: 8 rows 36 s, 113 rows 26 s,
256 rows 39 s)."""


def preferred_rows(entries_per_row: int) -> int:
    """The block height of about :data:`PREFERRED_BLOCK_ENTRIES` entries, between 16 and 256 rows."""
    return min(256, max(16, PREFERRED_BLOCK_ENTRIES // max(1, entries_per_row)))


def block_rows(model: Any, batch: int, n_keys: int, budget: int = DEFAULT_BUDGET) -> int:
    """Query rows of one streaming block: :func:`preferred_rows`, or fewer where ``budget`` bytes for
    ``batch`` sequences over ``n_keys`` keys hold fewer; an :class:`InputError` when not even one
    row fits."""
    entries = batch * int(model.cfg.n_heads) * n_keys
    per_row = entries * _BYTES_STREAMING
    if per_row > budget:
        raise InputError(
            f"a memory budget of {budget} bytes is too small for one streaming block: one query row "
            f"needs {per_row} bytes ({batch} sequences x {model.cfg.n_heads} heads x {n_keys} keys x "
            f"{_BYTES_STREAMING} bytes); raise budget to at least {per_row}"
        )
    return max(1, min(budget // per_row, preferred_rows(entries)))
