"""The documentation site: built with ``mkdocs build --strict``, it documents every public name, its
generated pages follow the code, it loads nothing from the network, and it renders in a browser.

The site is built once per session into a temporary folder (about 10 s), so the tests never read a
stale ``site/``. The browser test drives headless Chromium through Playwright, as
``tests/test_explorer_browser.py`` does: it opens the index and one API page from ``file://`` and
refuses every request that is not a local file. It skips, saying why, without Playwright or
Chromium, and fails instead under CI (``CI`` set); ``make test`` installs both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import tokext
from tests.browser import chromium_context
from tokext.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("mkdocs")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def inventory(site: Path) -> set[str]:
    """The identifiers in the site's ``objects.inv`` (Sphinx inventory v2: 4 header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines() if line}


def _defined_at(name: str) -> str:
    """Where ``tokext.<name>`` is defined: ``module.qualname`` (constants: the module that exports them)."""
    obj = getattr(tokext, name)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and module.startswith("tokext."):
        return f"{module}.{qualname}"
    return f"{tokext._EXPORTS[name]}.{name}"


def test_every_public_name_has_an_entry_on_its_room_page(site):
    documented = inventory(site)
    missing = []
    for name in tokext.__all__:
        if name == "__version__":
            continue
        where = _defined_at(name)
        room = where.split(".")[1]
        page = (site / "reference" / "api" / room / "index.html").read_text(encoding="utf-8")
        if where not in documented or f'id="{where}"' not in page:
            missing.append(where)
    assert not missing, f"public names without an entry on their room's API page: {missing}"


def test_api_index_links_every_public_name(site):
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in tokext.__all__:
        if name != "__version__":
            assert f'href="{_defined_at(name).split(".")[1]}/#{_defined_at(name)}"' in page, name


def test_cli_reference_is_the_parsers_help(site, monkeypatch):
    """Every subcommand's usage line, as argparse prints it at the page's width, is on the page."""
    page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", page).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, subparser in sub.choices.items():
        assert f"tokext {name}" in text, name
        for line in subparser.format_help().splitlines()[:3]:
            assert line.strip() in text, f"{name}: {line!r} not on the CLI page"


def test_tutorials_show_their_outputs(site):
    for name in ("01_probe_attention", "02_ablation_study", "03_model_organism"):
        page = (site / "tutorials" / name / "index.html").read_text(encoding="utf-8")
        assert page.count("jp-OutputArea-output") >= 3, f"{name}: the page shows no outputs"
        assert "assets/colab-badge.svg" in page and "colab.research.google.com/github/" in page


def test_nothing_is_loaded_from_the_network(site):
    """No page or stylesheet names a remote script, stylesheet, font or image (links are fine)."""
    remote = re.compile(
        r"""(?:src|srcset)\s*=\s*["']\s*(?:https?:)?//|<link[^>]+rel=["']?(?:stylesheet|preload|preconnect|"""
        r"""dns-prefetch)[^>]+href=["']\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import\s+["']?(?:url\()?\s*["']?(?:https?:)?//""",
        re.IGNORECASE,
    )
    found = []
    for path in list(site.rglob("*.html")) + list(site.rglob("*.css")):
        for match in remote.finditer(path.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{path.relative_to(site)}: {match.group(0)[:120]}")
    assert not found, "\n".join(found[:20])
    assert "fonts.googleapis" not in "".join(p.read_text(errors="replace") for p in site.rglob("*.html"))


# ---------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A Chromium context with a fresh, empty profile."""
    yield from chromium_context(tmp_path_factory, {"width": 1400, "height": 900})


def _open(context, path: Path):
    page = context.new_page()
    requests, refused, errors = [], [], []

    def route(handle):
        if handle.request.url.startswith("file://"):
            handle.continue_()
        else:
            refused.append(handle.request.url)
            handle.abort()

    page.route("**/*", route)
    page.on("request", lambda request: requests.append(request.url))
    page.on("websocket", lambda socket: refused.append(socket.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, requests, refused, errors


@pytest.mark.parametrize(
    "relative, heading, shown",
    [
        ("index.html", "tokext", 'article a[href="getting-started/"]'),
        (
            "reference/api/interventions/index.html",
            "tokext.interventions",
            '[id="tokext.interventions.emulation.EarlyLayerEmulation"]',
        ),
    ],
)
def test_pages_render_offline_in_a_browser(site, browser, relative, heading, shown):
    page, requests, refused, errors = _open(browser, site / relative)
    try:
        assert page.locator("article h1").first.inner_text().strip().rstrip("¶") == heading
        assert page.locator(shown).first.is_visible(), shown
        assert page.locator("nav.md-nav--primary").count() >= 1  # the theme's navigation was built
        # the stylesheet applied: the header bar is laid out by the theme's CSS
        assert page.evaluate("getComputedStyle(document.querySelector('header.md-header')).position") in (
            "sticky",
            "fixed",
        )
        assert refused == [], f"requests that left the page: {refused}"
        assert all(url.startswith(("file://", "data:", "blob:")) for url in requests), requests
        assert errors == [], f"errors on the page: {errors}"
    finally:
        page.close()
