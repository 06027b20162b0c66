"""Filler insertion, filler-span attention statistics (against an independent computation from a plain
``run_with_cache`` on single unpadded prompts) and the computed-tokens study on the tiny Llama model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tokext.errors import InputError
from tokext.evaluation.tasks import get_task, prompt
from tokext.models.loading import load_model
from tokext.studies.computed_tokens import (
    FULL_COT,
    POSITIONS,
    filler_span_attention,
    filler_tokens,
    insert_filler,
    run_computed_tokens_study,
    study_cells,
    truncate_cot,
)

EXAMPLE = get_task("arithmetic").generate(1, seed=0, level=1)[0]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.mark.parametrize("cot", [False, True])
def test_insertion_positions_are_exact_and_demos_untouched(cot):
    text = prompt(EXAMPLE, cot, shots=2)
    demos, final = text[: text.rindex("\n\n") + 2], text[text.rindex("\n\n") + 2 :]
    question, label = EXAMPLE.question, "Analysis:" if cot else "Answer:"
    f = " ." * 3
    expected = {
        "before_answer": final[: -len(label) - 1] + f + "\n" + label,
        "after_question": question + f + final[len(question) :],
        "before_question": f + final,
        "end": final + f,
    }
    for position in POSITIONS:
        filled = insert_filler(text, 3, " .", position)
        assert filled.startswith(demos), position
        assert filled[len(demos) :] == expected[position], position
        assert insert_filler(text, 0, " .", position) == text
    if not cot:
        assert insert_filler(text, 3, position="before_answer") == insert_filler(text, 3, position="after_question")


def test_insertion_errors_and_label():
    text = prompt(EXAMPLE, False, shots=1)
    with pytest.raises(InputError, match="position"):
        insert_filler(text, 2, position="middle")
    with pytest.raises(InputError, match="non-negative"):
        insert_filler(text, -1)
    with pytest.raises(InputError, match="label"):
        insert_filler("no label here", 2)
    assert insert_filler("1+2=;A:", 2, " ", "before_answer", label="A:") == "1+2=;  A:"
    assert insert_filler("1+2=;A:", 2, " ", "end", label="A:") == "1+2=;A:  "
    with pytest.raises(InputError, match="cot_lengths"):
        study_cells((0,), (), (-2,))
    with pytest.raises(InputError, match="unknown task"):
        run_computed_tokens_study(None, "arithmetc", 1)


def test_truncate_cot_keeps_response_line():
    ex = get_task("arithmetic").generate(1, seed=0, level=2)[0]
    assert truncate_cot(ex, 0).cot_solution == f"Response: {ex.answer}"
    assert truncate_cot(ex, 1).cot_solution.split("\n") == [ex.cot_solution.split("\n")[0], f"Response: {ex.answer}"]
    assert truncate_cot(ex, FULL_COT) == ex


def test_filler_token_span(llama):
    tok = llama.tokenizer
    base = "The capital of France is Paris , and the capital of Germany is\nAnswer:"
    dot = tok.convert_tokens_to_ids(".")
    for position in POSITIONS:
        text, ids, (start, end) = filler_tokens(tok, base, 4, " .", position)
        assert text == insert_filler(base, 4, " .", position)
        assert ids == list(tok(text).input_ids)
        assert end - start == 4 and ids[start:end] == [dot] * 4, position
    from tokext.models.organism import CharTokenizer

    text, ids, span = filler_tokens(CharTokenizer(), "1+2=;A:", 3, " ", "before_answer", label="A:")
    assert text == "1+2=;   A:" and span == (6, 9) and ids[0] == 1  # BOS first


PROMPTS = [
    ("The capital of France is Paris , and the capital of Germany is\nAnswer:", 6, "before_answer"),
    ("Why is the sky blue ?\nAnswer:", 3, "before_question"),
    ("x = 3 ; y = x + 2\nAnswer:", 1, "after_question"),
    ("a cat sat on the mat !\nShe said : hello world .\nAnswer:", 5, "end"),
    ("one two three\nAnswer:", 0, "before_answer"),
]


def reference_span_stats(model, seqs, spans, eps=0.3):
    """Definitions in plain numpy, one unpadded prompt at a time, from ``run_with_cache`` patterns."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    keys = (
        "span_mass",
        "alpha_filler",
        "alpha_content",
        "alpha_first",
        "filler_sink_frac",
        "content_sink_frac",
        "any_filler_sink",
    )
    sums = {k: np.zeros((n_layers, n_heads)) for k in keys}
    n = dict(after=0, filler=0, content=0, first=0, seqs=0)
    for ids, (s, e) in zip(seqs, spans):
        _, cache = model.run_with_cache(torch.tensor([ids]))
        t = len(ids)
        filler = [k for k in range(s, e)]
        content = [k for k in range(1, t) if not s <= k < e]
        n["after"] += (t - e) if e > s else 0
        n["filler"] += len(filler)
        n["content"] += len(content)
        n["first"] += 1
        n["seqs"] += e > s
        for layer in range(n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy()
            for head in range(n_heads):
                a = pattern[head]
                a = np.tril(a) / np.tril(a).sum(-1, keepdims=True)
                alpha = [a[k:, k].mean() for k in range(t)]
                if e > s:
                    sums["span_mass"][layer, head] += sum(a[q, s:e].sum() for q in range(e, t))
                    sums["any_filler_sink"][layer, head] += any(alpha[k] > eps for k in filler)
                sums["alpha_filler"][layer, head] += sum(alpha[k] for k in filler)
                sums["alpha_content"][layer, head] += sum(alpha[k] for k in content)
                sums["alpha_first"][layer, head] += alpha[0]
                sums["filler_sink_frac"][layer, head] += sum(alpha[k] > eps for k in filler)
                sums["content_sink_frac"][layer, head] += sum(alpha[k] > eps for k in content)
    denominators = dict(
        span_mass="after",
        alpha_filler="filler",
        alpha_content="content",
        alpha_first="first",
        filler_sink_frac="filler",
        content_sink_frac="content",
        any_filler_sink="seqs",
    )
    return {k: sums[k] / n[denominators[k]] for k in keys}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_span_stats_match_independent_computation(llama, batch_size):
    tok = llama.tokenizer
    filled = [filler_tokens(tok, text, count, " .", position) for text, count, position in PROMPTS]
    seqs, spans = [ids for _, ids, _ in filled], [span for _, _, span in filled]
    assert len({len(s) for s in seqs}) > 2  # padding really happens with batch_size 3
    frame = filler_span_attention(llama, [text for text, _, _ in filled], spans, batch_size=batch_size)
    ref = reference_span_stats(llama, seqs, spans)
    assert len(frame) == llama.cfg.n_layers * llama.cfg.n_heads
    for name, expected in ref.items():
        got = frame.pivot(index="layer", columns="head", values=name).to_numpy()
        diff = np.abs(got - expected)
        worst = np.unravel_index(diff.argmax(), diff.shape)
        assert diff.max() < 1e-5, f"{name}: max_diff={diff.max():.2e} at (layer, head)={worst}"
    # uniform attention gives alpha_k = mean over visible queries of 1/(q+1)
    uniform = np.mean(
        [np.mean([1 / (q + 1) for q in range(k, len(ids))]) for ids, (s, e) in zip(seqs, spans) for k in range(s, e)]
    )
    assert abs(frame["alpha_filler_uniform"].iloc[0] - uniform) < 1e-9
    assert frame["n_spans"].iloc[0] == 4


def test_span_stats_padding_invariant_and_layers(llama):
    tok = llama.tokenizer
    filled = [filler_tokens(tok, text, count, " .", position) for text, count, position in PROMPTS]
    texts, spans = [t for t, _, _ in filled], [s for _, _, s in filled]
    one = filler_span_attention(llama, texts, spans, batch_size=1)
    many = filler_span_attention(llama, texts, spans, batch_size=5)
    pd.testing.assert_frame_equal(one, many, atol=1e-6, rtol=0)
    sub = filler_span_attention(llama, texts, spans, layers=[1])
    pd.testing.assert_frame_equal(
        sub.reset_index(drop=True), one[one.layer == 1].reset_index(drop=True), atol=1e-6, rtol=0
    )
    with pytest.raises(InputError, match="spans"):
        filler_span_attention(llama, texts, spans[:2])
    with pytest.raises(InputError, match="not inside"):
        filler_span_attention(llama, texts[:1], [(0, 999)])


def test_study_runs_resumes_and_reports(llama):
    seen = []
    table = run_computed_tokens_study(
        llama,
        "variables",
        1,
        counts=(0, 2),
        positions=("before_answer", "end"),
        n=3,
        seed=0,
        shots=0,
        batch_size=2,
        on_cell=lambda cell, summary, items, span: seen.append((cell.key, items)),
    )
    assert list(table["count"]) == [0, 2, 2] and list(table["position"]) == ["none", "before_answer", "end"]
    assert (table.loc[table["count"] == 2, "filler_tokens"] == 2).all()
    assert table.loc[0, "filler_tokens"] == 0 and np.isnan(table.loc[0, "alpha_filler"])
    assert table["answer_loss"].notna().all() and table["accuracy"].between(0, 1).all()
    assert all(len(items) == 3 for _, items in seen)
    rest = run_computed_tokens_study(
        llama,
        "variables",
        1,
        counts=(0, 2),
        positions=("before_answer", "end"),
        n=3,
        seed=0,
        shots=0,
        batch_size=2,
        skip=[seen[0][0], seen[1][0]],
    )
    assert len(rest) == 1 and rest.loc[0, "position"] == "end"
    pd.testing.assert_series_equal(rest.iloc[0], table.iloc[2], check_names=False)


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "computed_tokens.py"
    spec = importlib.util.spec_from_file_location("computed_tokens_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_resumes_and_rejects_bad_input(tiny_llama_dir, tmp_path, capsys):
    import json

    script = _script()
    argv = [
        "--model",
        str(tiny_llama_dir),
        "--task",
        "variables",
        "--n",
        "2",
        "--shots",
        "0",
        "--counts",
        "0,2",
        "--accuracy",
        "greedy-match",
        "--out",
        str(tmp_path),
    ]
    assert script.main(argv) == 0
    out = next(tmp_path.glob("*/variables-L1"))
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["cell"]) == ["filler/none/0/0", "filler/before_answer/2/0"]
    assert len(pd.read_csv(out / "items.csv")) == 4
    assert len(pd.read_csv(out / "span_by_head.csv")) == 2 * 3 * 4  # cells x layers x heads
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["settings"]["counts"] == [0, 2] and prov["git_rev"] and prov["date"]
    # an interrupted run: the last cell's summary row is missing, its items are there (partial)
    pd.read_csv(out / "summary.csv").iloc[:1].to_csv(out / "summary.csv", index=False)
    assert script.main(argv) == 0
    assert json.loads((out / "provenance.json").read_text())["resumed_cells"] == ["filler/none/0/0"]
    assert list(pd.read_csv(out / "summary.csv")["cell"]) == list(summary["cell"])
    assert len(pd.read_csv(out / "items.csv")) == 4  # no duplicated rows
    # other settings in the same directory need --force
    assert script.main(argv[:-2] + ["--seed", "1", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    for bad, needle in (
        (["--task", "arithmetc"], "unknown task"),
        (["--positions", "middle"], "middle"),
        (["--counts", "0,x"], "--counts"),
        (["--level", "9"], "--level"),
        (["--model", "/no/such/dir"], "/no/such/dir"),
    ):
        assert script.main(argv + bad) == 2
        assert needle in capsys.readouterr().err
