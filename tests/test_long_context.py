"""The long-context study on a tiny random Llama: its tables against plain transformers' own
attentions (``output_attentions``, eager), resuming, the beyond-trained mark, bad plans, the figure."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from tokext.attention.masks import sees
from tokext.errors import InputError, TokextWarning
from tokext.evaluation.prompts import long_token_sequences
from tokext.models.architectures import LayerAttention
from tokext.studies.long_context import check_plan, queries_seeing, run_long_context

LENGTHS, WINDOWS = (48, 96), (2, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_eval):
    return tiny_eval


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):
    _, model = tiny
    out = tmp_path_factory.mktemp("long") / "long_context"
    tables = run_long_context(model, out, lengths=LENGTHS, windows=WINDOWS, tau=0.1, log=lambda m: None)
    return out, tables


def _oracle(directory, tokens: list[int], tau: float, min_queries: int) -> pd.DataFrame:
    """Per layer, from transformers' eager attentions: first-token mass and normalised entropy (means
    over heads and rows with at least two keys), and ACT hidden sinks (alpha_k = column mean over
    the queries that see k; keys after the first above tau, seen by at least min_queries queries)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = hf(torch.tensor([tokens]), output_attentions=True).attentions
    rows = []
    length = len(tokens)
    for layer, pattern in enumerate(attentions):
        p = pattern[0].double()  # [head, query, key]
        first = p[:, :, 0].mean().item()
        n_keys = torch.arange(1, length + 1, dtype=torch.float64)
        plogp = torch.special.xlogy(p, p).sum(-1)
        entropy = (-plogp[:, 1:] / torch.log(n_keys[1:])).mean().item()  # row 0 has one key
        alpha = p.sum(1) / (length - torch.arange(length, dtype=torch.float64))  # [head, key]
        count = 0
        for head in range(p.shape[0]):
            above = [k for k in range(length) if alpha[head, k] > tau]
            count += sum(1 for k in above[1:] if length - k >= min_queries)
        rows.append({"layer": layer, "first_token_mass": first, "entropy": entropy, "hidden_sinks": count})
    return pd.DataFrame(rows)


def test_tables_match_transformers_own_attentions(tiny, study):
    directory, model = tiny
    _, tables = study
    layers = tables["layers"]
    assert sorted(layers[["length", "window"]].drop_duplicates().itertuples(index=False, name=None)) == [
        (48, 0),
        (48, 1),
        (96, 0),
    ]
    for length, count in zip(LENGTHS, WINDOWS):
        texts = long_token_sequences(model, length, count)
        for window in range(count):
            ours = layers[(layers["length"] == length) & (layers["window"] == window)].reset_index(drop=True)
            reference = _oracle(directory, texts[window], 0.1, 64)
            np.testing.assert_allclose(ours["first_token_mass"], reference["first_token_mass"], atol=1e-5)
            np.testing.assert_allclose(ours["entropy"], reference["entropy"], atol=1e-5)
            assert ours["hidden_sinks"].tolist() == reference["hidden_sinks"].tolist()
    assert not layers["beyond_trained"].any()


def test_position_bins_cover_every_real_row_once(study):
    _, tables = study
    positions = tables["positions"]
    rows = positions.groupby(["length", "window", "layer"])["rows"].sum()
    assert (rows == rows.index.get_level_values("length")).all()  # batch 1: each query row in one bin
    first_bin = positions[positions["bin_start"] == 0]
    assert np.allclose(first_bin["first_token_mass"], 1.0)  # query 0 sees only itself


def test_rerun_resumes_without_recomputing_and_ignores_a_torn_run(tiny, study):
    _, model = tiny
    out, tables = study
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.npz")}
    (out / "runs" / "T96-w0.partial.npz").write_bytes(b"torn")  # an interrupted write
    again = run_long_context(model, out, lengths=LENGTHS, windows=WINDOWS, tau=0.1, log=lambda m: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("T*-w?.npz")} == stamps
    pd.testing.assert_frame_equal(again["layers"], tables["layers"])


def test_lengths_beyond_the_trained_context_are_marked(tiny, tmp_path):
    directory, _ = tiny
    from tokext.models.loading import load_model

    model = load_model(str(directory))
    with pytest.raises(InputError, match="n_ctx=1100"):
        run_long_context(model, tmp_path / "x", lengths=(1100,), windows=(1,), log=lambda m: None)
    with pytest.warns(TokextWarning, match="beyond the 1024 tokens"):
        model = load_model(str(directory), n_ctx=1100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokextWarning)
        tables = run_long_context(model, tmp_path / "y", lengths=(32, 1100), windows=(1,), log=lambda m: None)
    marks = tables["layers"].groupby("length")["beyond_trained"].all()
    assert marks.to_dict() == {32: False, 1100: True}


@pytest.mark.parametrize(
    "lengths, windows, match",
    [
        ((), (1,), "at least one"),
        ((512, 1024), (1, 2, 3), "window counts"),
        ((0,), (1,), "positive"),
        ((512,), (0,), "positive"),
        ((512, 512), (1,), "repeat"),
    ],
)
def test_bad_plans_are_refused(lengths, windows, match):
    with pytest.raises(InputError, match=match):
        check_plan(lengths, windows)


@pytest.mark.parametrize(
    "attention",
    [LayerAttention(), LayerAttention(window=5), LayerAttention(causal=False), LayerAttention(causal=False, window=3)],
)
def test_queries_seeing_counts_what_the_mask_shows(attention):
    length = 17
    brute = sees(torch.arange(length), torch.arange(length), attention).sum(0).numpy()
    assert queries_seeing(attention, length, np.arange(length)).tolist() == brute.tolist()


def test_figure_from_the_study(study, tmp_path):
    from tokext.viz.figures import long_context

    out, _ = study
    figure = long_context(out.parent, tmp_path)
    assert figure is not None and figure.name == "fig9_long_context"
    assert all(path.is_file() and path.stat().st_size > 0 for path in figure.files)
    assert "MMLU test questions" in figure.caption and "tiny-eval-llama" in figure.caption
