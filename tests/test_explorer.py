"""The explorer's data and page, without a browser (``tests/test_explorer_browser.py`` drives one).

What the page embeds is checked against transformers' own attentions (baseline) and against the
plain eager reference forward with the intervention's formula in it (edited); the head scores
against their definitions written row by row (``tests/explorer_reference.py``).
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests import explorer_reference as ref
from tokext.cli import main
from tokext.errors import EmptyInputError, InputError
from tokext.interventions import SinkRebalance
from tokext.models.loading import load_model
from tokext.models.native import native_model
from tokext.viz.explorer import GENERATOR, explore, head_scores
from tokext.attention.masks import visible_keys

TEXTS = ["The capital of France is Paris , and the capital of Germany is Berlin .", "Why is the sky blue ?"]
MAX_TOKENS = 9  # the first prompt has 15 tokens: it is cut


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def page(llama):
    return explore(llama, TEXTS, SinkRebalance(), max_tokens=MAX_TOKENS)


def _close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    miss = np.nanmax(np.abs(actual - expected)) if np.isfinite(expected).any() else 0.0
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN in different places"
    assert miss <= atol, f"{what}: max_diff={miss:.2e} > {atol:.1e}"


def test_baseline_patterns_and_scores_match_transformers(page, tiny_llama_dir):
    decimals = page.data["decimals"]
    for index, text in enumerate(TEXTS):
        full = ref.token_ids(tiny_llama_dir, text, 10_000)
        ids = full[:MAX_TOKENS]
        t = len(ids)
        entry = page.data["prompts"][index]
        assert entry["tokens"] == ref.labels(tiny_llama_dir, ids)
        assert entry["cut"] == (len(full) > MAX_TOKENS)
        assert entry["label"] == AutoTokenizer.from_pretrained(tiny_llama_dir).decode(ids)[:60]
        expected = ref.baseline_patterns(tiny_llama_dir, full)[:, :, :t, :t]  # the first t tokens of the full run
        run = entry["runs"]["baseline"]
        for layer in range(expected.shape[0]):
            for head in range(expected.shape[1]):
                shown = ref.page_pattern(run, layer, head, decimals)
                want = np.where(np.tri(t, dtype=bool), expected[layer, head], np.nan)
                _close(shown, want, 0.5 * 10**-decimals + 1e-7, f"prompt {index} layer {layer} head {head}")
        truth = ref.scores(expected)
        for key in ("first_token_mass", "entropy", "learned_sink_mass"):
            _close(np.array(run["scores"][key], dtype=float), truth[key], 1e-5, f"prompt {index} {key}")
        sinks = [
            [list(np.flatnonzero(truth["sinks"][layer, head])) for head in range(truth["sinks"].shape[1])]
            for layer in range(truth["sinks"].shape[0])
        ]
        assert run["sinks"] == sinks
        assert any(any(row) for row in run["sinks"])  # the comparison has something to compare


def test_the_page_says_how_the_prompts_were_cut(page):
    assert [p["cut"] for p in page.data["prompts"]] == [True, False]
    assert f"2 prompt(s), each cut to its first {MAX_TOKENS} tokens (1 of them longer)" in page.html
    assert "weights rounded to 3 decimals" in page.html


def test_edited_patterns_match_the_reference_forward(page, tiny_llama_dir):
    decimals = page.data["decimals"]
    assert page.data["intervention"] == "SinkRebalance()" and page.data["runs"] == ["baseline", "edited"]
    for index, text in enumerate(TEXTS):
        ids = ref.token_ids(tiny_llama_dir, text, MAX_TOKENS)
        t = len(ids)
        expected = ref.edited_patterns(tiny_llama_dir, ids, ref.first_token_sink_removed())
        run = page.data["prompts"][index]["runs"]["edited"]
        for layer in range(expected.shape[0]):
            for head in range(expected.shape[1]):
                want = np.where(np.tri(t, dtype=bool), expected[layer, head], np.nan)
                _close(
                    ref.page_pattern(run, layer, head, decimals),
                    want,
                    0.5 * 10**-decimals + 1e-6,
                    f"edited prompt {index} layer {layer} head {head}",
                )
        truth = ref.scores(expected)
        assert np.allclose(np.array(run["scores"]["first_token_mass"]), truth["first_token_mass"], atol=1e-5)
        # the first token keeps only its own row (query 0 sees nothing else): 1/t of the mass
        assert np.allclose(truth["first_token_mass"], 1 / t, atol=1e-6)


def test_head_scores_on_a_hand_computed_pattern():
    """Two heads on T = 3: a softmax head and one whose rows leave 0.2, 0.4, 0.6 to a learned sink."""
    pattern = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], [[0.8, 0.0, 0.0], [0.3, 0.3, 0.0], [0.1, 0.1, 0.2]]]
    )[None]
    scores = head_scores(pattern, visible_keys(torch.ones(1, 3)), sink_eps=0.39)
    h2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)) / math.log(3)
    assert np.allclose(scores["first_token_mass"][0], [(1 + 0.5 + 0.2) / 3, (1 + 0.5 + 0.25) / 3])
    assert np.allclose(scores["entropy"][0], [(1 + h2) / 2, (1 + 1.5 * math.log(2) / math.log(3)) / 2])
    assert np.allclose(scores["learned_sink_mass"][0], [0.0, 0.4])
    # alpha = [0.567, 0.4, 0.5] and [0.583, 0.375, 0.5]
    assert scores["sinks"][0].tolist() == [[True, True, True], [True, False, True]]


def test_a_model_without_tokenizer_shows_token_ids():
    model = native_model()
    tokens = torch.tensor([[5, 17, 3, 63], [9, 9, 1, 0]])
    page = explore(model, tokens)
    assert [p["tokens"] for p in page.data["prompts"]] == [["5", "17", "3", "63"], ["9", "9", "1", "0"]]
    assert page.data["runs"] == ["baseline"] and page.data["intervention"] is None
    with pytest.raises(InputError, match="no tokenizer: pass token ids"):
        explore(model, ["some text"])


def _forward_counter(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([""], EmptyInputError, "input 0 is an empty or blank string"),
        (["ok", "   "], EmptyInputError, "input 1 is an empty or blank string"),
        ([], EmptyInputError, "no inputs"),
        ("one string", InputError, "wrap it in a list"),
    ],
)
def test_bad_prompts_fail_before_any_forward(llama, prompts, error, message):
    calls, handle = _forward_counter(llama)
    try:
        with pytest.raises(error, match=message):
            explore(llama, prompts)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"decimals": 0}, "decimals must be an integer from 1 to 6"),
        ({"intervention": "SinkRebalance"}, "explore takes Intervention objects"),
    ],
)
def test_bad_settings_fail_before_any_forward(llama, kwargs, message):
    calls, handle = _forward_counter(llama)
    try:
        with pytest.raises(InputError, match=message):
            explore(llama, TEXTS, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def _hook_count(model) -> int:
    return sum(len(point.fwd_hooks) for point in model.hook_dict.values()) + sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )


def test_no_hook_is_left_when_the_run_fails(llama):
    """A user's hook in layer 1 raises in the middle of the edited run: tokext's hooks are all gone,
    the user's is still there."""
    before = _hook_count(llama)
    calls = []

    def broken(pattern, hook):
        calls.append(1)
        if len(calls) == 2:  # the first prompt's edited run (its baseline run was call 1)
            raise RuntimeError("a user's hook failed")

    point = llama.hook_dict["blocks.1.attn.hook_pattern"]
    point.add_hook(broken, dir="fwd")
    with_user = _hook_count(llama)
    try:
        with pytest.raises(RuntimeError, match="a user's hook failed"):
            explore(llama, TEXTS, SinkRebalance())
        assert len(calls) == 2
        assert _hook_count(llama) == with_user > before
        assert len(point.fwd_hooks) == 1
    finally:
        point.remove_hooks("fwd")
    assert _hook_count(llama) == before
    explore(llama, TEXTS[1:])  # and the model still runs cleanly


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def test_page_is_self_contained_with_one_cell_per_head(page):
    tags = _tags(page.html)
    links = [(tag, attrs[key]) for tag, attrs in tags for key in ("src", "href", "data", "srcset") if attrs.get(key)]
    assert links == [], f"the page refers to outside resources: {links[:5]}"
    # nor in markup the parser would miss (Plotly's inlined JavaScript only mentions URLs in strings)
    for pattern in (
        r"<script[^>]*\ssrc=",
        r"<link[^>]*\shref=",
        r"<img[^>]*\ssrc=",
        r"<iframe",
        r"@import",
        r"url\(\s*['\"]?(https?:)?//",
    ):
        assert not re.search(pattern, page.html, re.I), pattern
    cells = [(int(a["data-layer"]), int(a["data-head"])) for tag, a in tags if a.get("class") == "cell"]
    assert sorted(cells) == [(layer, head) for layer in range(3) for head in range(4)]
    csp = [a["content"] for tag, a in tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0] and "connect-src" not in csp[0]


def test_notebook_view_is_the_page_in_an_iframe(page):
    tags = _tags(page._repr_html_())
    assert [tag for tag, _ in tags] == ["iframe"]
    assert tags[0][1]["srcdoc"] == page.html  # the parser unescapes the attribute


def test_save_writes_the_page_and_never_overwrites_a_foreign_file(page, tmp_path):
    target = page.save(tmp_path / "sub" / "x.html")
    assert target.read_text(encoding="utf-8") == page.html
    assert page.save(target) == target  # an explorer page written before is replaced
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(InputError, match="refusing to overwrite .* not a tokext explorer page"):
        page.save(mine)
    assert mine.read_text() == "<html>my notes</html>"
    with pytest.raises(InputError, match="is a folder"):
        page.save(tmp_path)
    assert GENERATOR in page.html[:400]


def test_analyze_html_writes_the_explorer_for_the_analysed_prompts(tmp_path, capsys, tiny_llama_dir):
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(TEXTS + ["one two three"]) + "\n")
    target = tmp_path / "explorer.html"
    assert (
        main(
            [
                "analyze",
                "--model",
                str(tiny_llama_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--html",
                str(target),
                "--html-prompts",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"wrote the attention explorer to {target} (open it in a browser; it works offline)")
    )
    text = target.read_text(encoding="utf-8")
    cells = [a for tag, a in _tags(text) if a.get("class") == "cell"]
    assert len(cells) == 3 * 4
    for text_ in TEXTS:  # the first two analysed prompts, token by token
        labels = ref.labels(tiny_llama_dir, ref.token_ids(tiny_llama_dir, text_, 64))
        assert ",".join(f'"{label}"' for label in labels) in text
    assert '"one","two","three"' not in text
    assert not (tmp_path / "o" / "explorer.html").exists()


def test_analyze_html_refuses_a_foreign_file_before_loading_the_model(tmp_path, capsys):
    mine = tmp_path / "mine.html"
    mine.write_text("mine")
    status = main(["analyze", "--model", str(tmp_path / "no-such-model"), "--html", str(mine), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "refusing to overwrite" in err and "no-such-model" not in err
    assert mine.read_text() == "mine"


# ---------------------------------------------------------------------- norms=True: two more colourings


@pytest.fixture(scope="module")
def norm_page(llama):
    return explore(llama, TEXTS, SinkRebalance(), max_tokens=MAX_TOKENS, norms=True)


def _oracle_norm_scores(tiny_llama_dir, ids, edit=None):
    """Norm-weighted alpha_0 and head-output norm [layer, head] of one prompt from transformers itself
    (forward hooks, the oracle attention function: tests/conformance.py)."""
    from transformers import AutoModelForCausalLM

    from tests import conformance as C

    C.register_oracle()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="tokext_oracle").eval()
    run = C.oracle_norm_forward("Llama", torch.tensor([ids]), model=hf, edit=edit)
    pooled = C.pool_oracle_norms([run], hf.config.num_attention_heads, {"abs_threshold": 1e9, "ratio": 1e9})
    return pooled["norm_weighted_received"][:, :, 0], pooled["head_output_norm"]


def test_norm_colourings_match_transformers(norm_page, tiny_llama_dir):
    keys = [m["key"] for m in norm_page.data["metrics"]]
    assert keys[-2:] == ["norm_weighted_first", "head_output_norm"]
    assert [m["unbounded"] for m in norm_page.data["metrics"]][-2:] == [False, True]
    for index, text in enumerate(TEXTS):
        ids = ref.token_ids(tiny_llama_dir, text, MAX_TOKENS)
        for run, edit in (("baseline", None), ("edited", ref.first_token_sink_removed())):
            weighted, output = _oracle_norm_scores(tiny_llama_dir, ids, edit)
            scores = norm_page.data["prompts"][index]["runs"][run]["scores"]
            _close(
                np.array(scores["norm_weighted_first"], float), weighted, 1e-5, f"prompt {index} {run} norm-weighted"
            )
            _close(
                np.array(scores["head_output_norm"], float),
                output,
                5e-7 + 1e-5 * output.max(),
                f"prompt {index} {run} AHON",
            )
        edited = np.array(norm_page.data["prompts"][index]["runs"]["edited"]["scores"]["norm_weighted_first"])
        # SinkRebalance removes the first token from every row but its own: 1/t of the norm-weighted mass
        assert np.allclose(edited, 1 / len(ids), atol=1e-6)
    assert "norm-weighted mass" in norm_page.html


def test_norm_colourings_only_when_asked(page):
    assert [m["key"] for m in page.data["metrics"]] == ["first_token_mass", "entropy", "learned_sink_mass"]
    assert "head_output_norm" not in page.data["prompts"][0]["runs"]["baseline"]["scores"]
