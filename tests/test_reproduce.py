"""`tokext reproduce --quick` end to end on SmolLM2 + the organism, then `tokext figures` from its results."""

from __future__ import annotations

import pytest

from tokext.cli import main

pytestmark = pytest.mark.slow


def test_reproduce_quick_then_figures(smollm2, tmp_path, capsys):
    results, figures = tmp_path / "results", tmp_path / "figures"
    assert main(["reproduce", "--quick", "--results", str(results), "--figures", str(figures)]) == 0
    report = (figures / "REPORT.md").read_text()
    for name in (
        "fig1_head_patterns",
        "fig2_sink_entropy",
        "fig3_profiles",
        "fig4_ablation",
        "fig5_alpha_sweep",
        "fig8_organism",
        "fig9_long_context",
        "fig10_sink_anatomy",
        "fig11_causal",
    ):
        assert (figures / f"{name}.png").is_file() and (figures / f"{name}.pdf").is_file(), name
        assert f"({name}.png)" in report
    assert "| task | level | prompt | intervention |" in report and "SmolLM2-135M-Instruct" in report
    assert "## Model organism" in report and "organism_ablation" in report
    capsys.readouterr()
    # a second run reuses every cached step
    assert main(["reproduce", "--quick", "--results", str(results), "--figures", str(figures)]) == 0
    assert "running" not in capsys.readouterr().out
    # figures from saved results only
    again = tmp_path / "again"
    assert main(["figures", "--results", str(results / "quick"), "--out", str(again)]) == 0
    assert (again / "REPORT.md").is_file()


def test_figures_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["figures", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "f")]) == 2
    assert "results directory not found" in capsys.readouterr().err
