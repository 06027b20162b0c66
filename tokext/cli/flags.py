"""Flags that several ``tokext`` commands share."""

from __future__ import annotations

import argparse
from typing import Any

from tokext.attention.engines.choose import ENGINES


def add_engine_flag(p: argparse.ArgumentParser | Any, default: str | None, default_text: str) -> None:
    """``--engine``: how attention runs (:mod:`tokext.attention.engines`)."""
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=default,
        help="attention engine: hooks (eager; hook_pattern), streaming (query blocks, no [T, T] pattern; "
        "same numbers to 1e-5) or auto (streaming when one layer's patterns would exceed 128 MiB); "
        f"default: {default_text}",
    )
