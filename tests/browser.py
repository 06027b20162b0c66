"""Headless Chromium for the browser tests (the explorer page, the documentation site).

Skipped, with the reason, when Playwright or Chromium is missing; under CI (``CI`` set) that is a
failure instead, so the checks cannot vanish there. ``make test`` installs both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("TOKEXT_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_context(tmp_path_factory: Any, viewport: dict[str, int]) -> Iterator[Any]:
    """A Playwright Chromium context with a fresh, empty profile (for a module-scoped fixture)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, which `make test` does as root)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run under CI, but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport=viewport,
        )
        yield context
        context.close()
