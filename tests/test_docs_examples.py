"""The documentation's code examples run: every fenced ``python`` block of ``docs/**/*.md``.

The blocks of one page run in order in one namespace, as a reader would paste them, from the
repository root. ``tokext.load_model()`` (the default model, SmolLM2-135M) is replaced by a tiny
random Llama (the tests' tokenizer, a 2,048-token context for the task prompts), so the pages run in
seconds; any other spec loads as usual. A block
preceded by ``<!-- no-run: reason -->`` is not run (a 70B model, a multi-minute lm-eval run), and
the reason is required. Each page's blocks must also have left no tokext hook attached.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import tokext
import tokext.models
import tokext.models.loading
from tests.models_fixtures import long_llama_dir
from tests.test_bad_input import attached_hooks
from tokext.errors import TokextWarning

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FENCE = re.compile(r"(?P<marker><!-- no-run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)\n```", re.DOTALL)


def blocks(path: Path) -> list[tuple[str, str | None]]:
    """``(code, no-run reason or None)`` of every fenced python block of a page, in order."""
    return [(m.group("code"), m.group("reason")) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


PAGES = sorted(p for p in DOCS.rglob("*.md") if any(reason is None for _, reason in blocks(p)))


def test_the_fence_reader_sees_the_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n<!-- no-run: needs a GPU -->\n```python\ny = 2\n```\n```bash\nz\n```\n"
    )
    assert blocks(page) == [("x = 1", None), ("y = 2", "needs a GPU")]
    assert len(PAGES) >= 8, [p.name for p in PAGES]


def test_every_skipped_block_says_why():
    for page in DOCS.rglob("*.md"):
        for code, reason in blocks(page):
            assert reason is None or reason.strip(), f"{page}: a no-run block without a reason:\n{code}"


@pytest.fixture()
def tiny_default_model(monkeypatch):
    real = tokext.models.loading.load_model
    tiny = str(long_llama_dir())

    def load_model(spec: str = tokext.models.loading.DEFAULT_MODEL, **kwargs):
        return real(tiny if spec == tokext.models.loading.DEFAULT_MODEL else spec, **kwargs)

    for module in (tokext, tokext.models, tokext.models.loading):
        monkeypatch.setattr(module, "load_model", load_model)
    return load_model


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples_run(page, tiny_default_model, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    loaded = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokextWarning)  # e.g. n_ctx beyond the tiny model's context
        for index, (code, reason) in enumerate(blocks(page)):
            if reason is not None:
                continue
            try:
                exec(compile(code, f"{page.relative_to(DOCS)}[block {index}]", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{page.relative_to(DOCS)}, block {index} failed:\n{code}") from err
            if "model" in namespace:
                loaded.append(namespace["model"])
    for model in loaded:
        assert attached_hooks(model) == 0, f"{page.name}: a tokext hook is left attached"


def test_readme_is_a_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes (at most 12 KB)"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) >= 10
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
