"""The explorer page in a real browser: headless Chromium (Debian package ``chromium``) driven by Playwright.

Three checks on a tiny Llama with an intervention, each against an independent computation
(``tests/explorer_reference.py``): the page renders one coloured cell per (layer, head); clicking a
cell draws that head's baseline, edited and difference patterns, with the tokens as labels, the
weight under the mouse on hover and the sink columns outlined; no request leaves the page. A slow
test does the same on SmolLM2-135M and, when ``TOKEXT_EXPLORER_SCREENSHOT`` names a PNG file,
writes the screenshot shown in the README there::

    TOKEXT_EXPLORER_SCREENSHOT=figures/explorer.png python -m pytest tests/test_explorer_browser.py -k smollm2

Skipped, with the reason, when Playwright or Chromium is missing; under CI (``CI`` set) that is a
failure instead, so the check cannot vanish there. ``make test`` installs both.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests import explorer_reference as ref
from tests.browser import chromium_context
from tests.tiny_hf import reference_attentions
from tokext.evaluation.prompts import builtin_prompts
from tokext.interventions import EarlyLayerEmulation, SinkRebalance
from tokext.models.loading import _smollm2_dir, load_model
from tokext.viz.explorer import explore

TEXTS = ["The capital of France is Paris , and the capital of Germany is Berlin .", "Why is the sky blue ?"]
MAX_TOKENS = 9
SCREENSHOT_HEAD = (12, 1)  # the SmolLM2 head shown in the README's screenshot


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A Chromium context with a fresh, empty profile."""
    yield from chromium_context(tmp_path_factory, {"width": 1600, "height": 720})


def open_page(context, path: Path, ready: bool = True) -> SimpleNamespace:
    """Open ``path``; every request and page error is recorded, and every non-file request refused.

    ``ready``: wait for the explorer's script to have drawn the grid (False for a page holding it)."""
    page = context.new_page()
    seen = SimpleNamespace(page=page, url=path.resolve().as_uri(), requests=[], refused=[], errors=[], sockets=[])

    def route(handle):
        if handle.request.url.startswith("file://"):
            handle.continue_()
        else:
            seen.refused.append(handle.request.url)
            handle.abort()

    page.route("**/*", route)
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on("websocket", lambda socket: seen.sockets.append(socket.url))
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    page.on("console", lambda message: seen.errors.append(message.text) if message.type == "error" else None)
    page.goto(seen.url)
    if ready:
        page.wait_for_selector("body[data-ready='1']")
    return seen


def assert_nothing_left_the_page(seen: SimpleNamespace) -> None:
    outside = [url for url in seen.requests if url != seen.url and not url.startswith(("data:", "blob:"))]
    assert outside == [] and seen.refused == [] and seen.sockets == [], (
        f"requests from the page: {outside + seen.refused + seen.sockets}"
    )
    assert seen.requests[0] == seen.url
    assert seen.errors == [], f"errors on the page: {seen.errors}"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """The page on the tiny Llama with ``SinkRebalance()``, and what it must show."""
    page = explore(load_model(str(tiny_llama_dir)), TEXTS, SinkRebalance(), max_tokens=MAX_TOKENS)
    path = page.save(tmp_path_factory.mktemp("explorer") / "tiny.html")
    truth = []
    for text in TEXTS:
        ids = ref.token_ids(tiny_llama_dir, text, MAX_TOKENS)
        baseline = ref.baseline_patterns(tiny_llama_dir, ids)
        edited = ref.edited_patterns(tiny_llama_dir, ids, ref.first_token_sink_removed())
        truth.append(
            {
                "labels": ref.labels(tiny_llama_dir, ids),
                "baseline": baseline,
                "edited": edited,
                "scores": {"baseline": ref.scores(baseline), "edited": ref.scores(edited)},
            }
        )
    return SimpleNamespace(explorer=page, path=path, truth=truth, n_layers=3, n_heads=4, decimals=page.data["decimals"])


def cell_values(page) -> dict[tuple[int, int], float]:
    rows = page.eval_on_selector_all(
        ".cell",
        "cells => cells.map(c => [+c.dataset.layer, +c.dataset.head, "
        "c.dataset.value, getComputedStyle(c).backgroundColor])",
    )
    assert all(colour.startswith("rgb(") for *_, colour in rows)
    return {(layer, head): float(value) for layer, head, value, _ in rows}


def _grid_matches(values: dict, expected: np.ndarray, what: str) -> None:
    got = np.array([[values[(layer, head)] for head in range(expected.shape[1])] for layer in range(expected.shape[0])])
    miss = np.abs(got - expected).max()
    assert miss < 1e-5, f"grid {what}: max_diff={miss:.2e}"


def test_page_renders_one_cell_per_head(browser, tiny):
    seen = open_page(browser, tiny.path)
    page = seen.page
    boxes = page.eval_on_selector_all(
        ".cell",
        "cells => cells.map(c => [+c.dataset.layer, +c.dataset.head, "
        "c.getBoundingClientRect().width, c.getBoundingClientRect().height])",
    )
    assert sorted((layer, head) for layer, head, *_ in boxes) == [
        (layer, head) for layer in range(tiny.n_layers) for head in range(tiny.n_heads)
    ]
    assert all(w >= 10 and h >= 10 for *_, w, h in boxes), "cells are not drawn"
    _grid_matches(cell_values(page), tiny.truth[0]["scores"]["baseline"]["first_token_mass"], "first-token mass")
    page.select_option("#metric", "entropy")
    _grid_matches(cell_values(page), tiny.truth[0]["scores"]["baseline"]["entropy"], "entropy")
    page.select_option("#prompt", "1")
    _grid_matches(cell_values(page), tiny.truth[1]["scores"]["baseline"]["entropy"], "entropy of prompt 1")
    page.select_option("#run", "difference")
    scores = tiny.truth[1]["scores"]
    _grid_matches(cell_values(page), scores["edited"]["entropy"] - scores["baseline"]["entropy"], "entropy difference")
    assert_nothing_left_the_page(seen)


def _plot(page, run: str):
    return page.evaluate(
        "run => { const gd = document.getElementById('plot-' + run); "
        "return {z: gd.data[0].z, sinks: gd.layout.shapes.map(s => s.x0 + 0.5), "
        "title: gd.layout.title.text, sinkAttr: gd.dataset.sinks}; }",
        run,
    )


def _as_array(z) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in z], dtype=float)


def test_clicking_a_cell_shows_that_heads_pattern(browser, tiny):
    seen = open_page(browser, tiny.path)
    page = seen.page
    truth = tiny.truth[0]
    t = len(truth["labels"])
    lower = np.tri(t, dtype=bool)
    tol = 0.5 * 10**-tiny.decimals + 1e-6
    for layer, head in [(1, 2), (2, 0)]:
        page.click(f".cell[data-layer='{layer}'][data-head='{head}']")
        panel = page.eval_on_selector("#head", "p => [p.dataset.layer, p.dataset.head]")
        assert panel == [str(layer), str(head)]
        assert page.text_content("#head-title") == f"layer {layer}, head {head} on prompt 0"
        selected = page.eval_on_selector_all(".cell.selected", "cs => cs.map(c => [+c.dataset.layer, +c.dataset.head])")
        assert selected == [[layer, head]]
        shown = {run: _plot(page, run) for run in ("baseline", "edited", "difference")}
        for run in ("baseline", "edited"):
            want = np.where(lower, truth[run][layer, head], np.nan)
            got = _as_array(shown[run]["z"])
            assert np.array_equal(np.isnan(got), ~lower)
            assert np.nanmax(np.abs(got - want)) <= tol, f"{run} layer {layer} head {head}"
            sinks = list(np.flatnonzero(truth["scores"][run]["sinks"][layer, head]))
            assert shown[run]["sinks"] == sinks and shown[run]["sinkAttr"] == ",".join(map(str, sinks))
            assert shown[run]["title"] == run
        diff = np.where(lower, truth["edited"][layer, head] - truth["baseline"][layer, head], np.nan)
        assert np.nanmax(np.abs(_as_array(shown["difference"]["z"]) - diff)) <= 2 * tol
        ticks = page.eval_on_selector_all("#plot-baseline .xtick text", "ts => ts.map(t => t.textContent)")
        assert ticks == truth["labels"]  # "<s>" included: labels are escaped for Plotly, shown as text
        assert page.eval_on_selector_all("#plot-baseline .ytick text", "ts => ts.map(t => t.textContent)") == ticks

    # the weight under the mouse, on hover: query 5, key 2 of layer 2, head 0
    i, j = 5, 2
    x, y = page.evaluate(
        "([i, j]) => { const gd = document.getElementById('plot-baseline'); "
        "const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect(); "
        "return [r.left + xa._offset + xa.l2p(j), r.top + ya._offset + ya.l2p(i)]; }",
        [i, j],
    )
    page.mouse.move(x, y)
    page.wait_for_selector("#plot-baseline .hoverlayer .hovertext")
    hover = page.text_content("#plot-baseline .hoverlayer .hovertext")
    labels = truth["labels"]
    assert f"query {i}: {labels[i]}" in hover and f"key {j}: {labels[j]}" in hover
    assert f"weight {truth['baseline'][2, 0, i, j]:.{tiny.decimals}f}" in hover, hover
    assert_nothing_left_the_page(seen)


def test_no_request_leaves_the_page(browser, tiny):
    """Every control and every cell used, then the requests: only the page's own file."""
    seen = open_page(browser, tiny.path)
    page = seen.page
    for prompt in ("0", "1"):
        page.select_option("#prompt", prompt)
        for metric in ("first_token_mass", "entropy", "learned_sink_mass"):
            page.select_option("#metric", metric)
            for run in ("baseline", "edited", "difference"):
                page.select_option("#run", run)
        for layer in range(tiny.n_layers):
            for head in range(tiny.n_heads):
                page.click(f".cell[data-layer='{layer}'][data-head='{head}']")
    page.hover("#plot-edited .nsewdrag")
    page.wait_for_timeout(200)
    assert len(seen.requests) >= 1
    assert_nothing_left_the_page(seen)


def test_notebook_view_renders_the_same_page(browser, tiny, tmp_path):
    """What a notebook shows (``_repr_html_``: the page in a sandboxed iframe) works in the browser too."""
    wrapper = tmp_path / "notebook.html"
    wrapper.write_text(f"<!DOCTYPE html><html><body>{tiny.explorer._repr_html_()}</body></html>", encoding="utf-8")
    seen = open_page(browser, wrapper, ready=False)
    frame = seen.page.frame_locator("iframe")
    frame.locator("body[data-ready='1']").wait_for()
    assert frame.locator(".cell").count() == tiny.n_layers * tiny.n_heads
    frame.locator(".cell[data-layer='2'][data-head='3']").click()
    assert frame.locator("#head-title").text_content() == "layer 2, head 3 on prompt 0"
    z = frame.locator("#plot-baseline").evaluate("gd => gd.data[0].z")
    t = len(tiny.truth[0]["labels"])
    want = np.where(np.tri(t, dtype=bool), tiny.truth[0]["baseline"][2, 3], np.nan)
    assert np.nanmax(np.abs(_as_array(z) - want)) <= 0.5 * 10**-tiny.decimals + 1e-6
    outside = [url for url in seen.requests if url != seen.url and not url.startswith(("data:", "blob:", "about:"))]
    assert outside == [] and seen.refused == [] and seen.sockets == [] and seen.errors == []


def test_norm_colourings_in_the_browser(browser, tiny_llama_dir, tmp_path):
    """``norms=True``: the grid coloured by norm-weighted first-token mass and by head-output norm shows
    transformers' own values (tests/conformance.py's oracle); the head-output norm's colours run from 0
    to the grid's largest value."""
    from tests.test_explorer import _oracle_norm_scores

    page = explore(load_model(str(tiny_llama_dir)), TEXTS, max_tokens=MAX_TOKENS, norms=True)
    seen = open_page(browser, page.save(tmp_path / "norms.html"))
    for prompt, text in enumerate(TEXTS):
        seen.page.select_option("#prompt", str(prompt))
        weighted, output = _oracle_norm_scores(tiny_llama_dir, ref.token_ids(tiny_llama_dir, text, MAX_TOKENS))
        seen.page.select_option("#metric", "norm_weighted_first")
        _grid_matches(cell_values(seen.page), weighted, f"norm-weighted first-token mass of prompt {prompt}")
        seen.page.select_option("#metric", "head_output_norm")
        values = cell_values(seen.page)
        got = np.array([[values[(layer, head)] for head in range(4)] for layer in range(3)])
        assert np.abs(got - output).max() < 1e-6 + 1e-5 * output.max(), f"head-output norm of prompt {prompt}"
        top = np.unravel_index(np.argmax(output), output.shape)
        colour = seen.page.eval_on_selector(
            f".cell[data-layer='{top[0]}'][data-head='{top[1]}']", "c => getComputedStyle(c).backgroundColor"
        )
        assert colour == "rgb(253, 231, 37)", colour  # the top of the colour scale
        assert float(seen.page.text_content("#legend-hi")) == pytest.approx(output.max(), abs=1e-3)
    assert_nothing_left_the_page(seen)


@pytest.mark.slow
def test_smollm2_page_in_the_browser(browser, smollm2, tmp_path):
    """SmolLM2-135M-Instruct, two built-in prompts, EarlyLayerEmulation(alpha=0.2): the README's screenshot."""
    import torch

    prompts = builtin_prompts()[:2]
    page = explore(smollm2, prompts, EarlyLayerEmulation(alpha=0.2))
    seen = open_page(browser, page.save(tmp_path / "explorer.html"))
    assert len(seen.page.query_selector_all(".cell")) == 30 * 9
    layer, head = SCREENSHOT_HEAD
    seen.page.click(f".cell[data-layer='{layer}'][data-head='{head}']")
    seen.page.wait_for_timeout(300)
    # the baseline pattern against a separately loaded transformers model of the same converted files
    ids = smollm2.tokenizer(prompts[0]).input_ids
    attentions, _ = reference_attentions(_smollm2_dir(), torch.tensor([ids]))
    want = attentions[layer][0, head].numpy()
    got = _as_array(_plot(seen.page, "baseline")["z"])
    assert (
        got.shape == want.shape and np.nanmax(np.abs(got - np.where(np.tri(len(ids), dtype=bool), want, np.nan))) < 6e-4
    )
    shot = seen.page.screenshot(full_page=True)
    assert len(shot) > 50_000
    target = os.environ.get("TOKEXT_EXPLORER_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot)
    assert_nothing_left_the_page(seen)
