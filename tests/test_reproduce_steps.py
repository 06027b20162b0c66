"""Step caching of `tokext reproduce`, without a model: cached steps are reused, --force recomputes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokext.studies.reproduce import LONG_CONTEXT_STUDY, Reproduction


def _runner(calls: list):
    def run(folder):
        calls.append(folder.name)
        (folder / "result.txt").write_text("new")

    return run


def test_finished_steps_are_reused_and_force_starts_them_afresh(tmp_path):
    calls: list = []
    repro = Reproduction("quick", results=tmp_path, log=lambda msg: None)
    folder = repro.step("demo", _runner(calls))
    assert calls == ["demo"] and (folder / "result.txt").read_text() == "new"
    # a runner that writes no provenance of its own still marks the step done
    assert json.loads((folder / "provenance.json").read_text())["step"] == "demo"
    repro.step("demo", _runner(calls))
    assert calls == ["demo"]  # cached
    (folder / "stale.txt").write_text("from an older run")
    forced = Reproduction("quick", results=tmp_path, force=True, log=lambda msg: None)
    forced.step("demo", _runner(calls))
    assert calls == ["demo", "demo"] and not (folder / "stale.txt").exists()


def test_a_step_that_fails_is_not_marked_done(tmp_path):
    repro = Reproduction("quick", results=tmp_path, log=lambda msg: None)

    def broken(folder):
        raise RuntimeError("boom")

    try:
        repro.step("demo", broken)
    except RuntimeError:
        pass
    assert not (tmp_path / "quick" / "demo" / "provenance.json").exists()
    calls: list = []
    repro.step("demo", _runner(calls))
    assert calls == ["demo"]


# ---------------------------------------------------------------------- make demo leaves figures/ as committed

REPO = Path(__file__).resolve().parent.parent


def _caption(report: str, title: str) -> str:
    """The caption paragraph under the figure heading that ends with ``title``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Figure") and line.endswith(title))
    return lines[start + 4]


def test_default_mode_draws_fig9_from_the_committed_study(tmp_path):
    """The default mode copies the committed 512-32k study (no model is loaded) and redraws figure 9
    byte for byte as committed in figures/, with the same caption in REPORT.md, twice over."""
    from tokext.viz.figures import build_all

    repro = Reproduction("default", results=tmp_path / "results", log=lambda msg: None)
    assert repro.long_context_source == LONG_CONTEXT_STUDY
    folder = repro.step("long_context", repro.long_context)
    assert repro._model is None  # nothing was run
    for name in ("layers.csv", "positions.csv", "provenance.json"):
        assert (folder / name).read_bytes() == (LONG_CONTEXT_STUDY / name).read_bytes()
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        build_all(repro.root, out)
    for suffix in (".png", ".pdf"):
        committed = (REPO / "figures" / f"fig9_long_context{suffix}").read_bytes()
        for out in outs:
            assert (out / f"fig9_long_context{suffix}").read_bytes() == committed, f"{out.name}: fig9{suffix} differs"
    reports = [(out / "REPORT.md").read_text() for out in outs]
    assert reports[0] == reports[1]
    assert not re.search(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", reports[0]), "REPORT.md carries a timestamp"
    title = "Attention sinks at long context"
    assert _caption(reports[0], title) == _caption((REPO / "figures" / "REPORT.md").read_text(), title)


def test_the_long_context_study_reruns_when_asked_or_outside_the_default_mode(tmp_path):
    assert Reproduction("default", results=tmp_path, rerun_long_context=True).long_context_source is None
    assert Reproduction("quick", results=tmp_path).long_context_source is None
    assert Reproduction("full", results=tmp_path).long_context_source is None
    missing = tmp_path / "no-study"
    assert Reproduction("default", results=tmp_path, long_context_study=missing).long_context_source is None


def test_rerun_long_context_flag_reaches_the_reproduction(monkeypatch, tmp_path):
    import tokext.studies.reproduce as reproduce
    from tokext.cli import main

    seen = {}

    def fake_run(self, figures):
        seen["source"] = self.long_context_source
        return Path(figures)

    monkeypatch.setattr(reproduce.Reproduction, "run", fake_run)
    assert main(["reproduce", "--results", str(tmp_path), "--figures", str(tmp_path / "f")]) == 0
    assert seen["source"] == LONG_CONTEXT_STUDY
    assert main(["reproduce", "--rerun-long-context", "--results", str(tmp_path), "--figures", str(tmp_path)]) == 0
    assert seen["source"] is None


def test_default_mode_draws_fig10_and_fig11_from_the_committed_studies(tmp_path):
    """On the default model the anatomy and causal steps copy their committed runs (no model is
    loaded), and figures 10 and 11 come back byte for byte as committed, with REPORT.md's captions."""
    from tokext.studies.reproduce import COMMITTED_STUDIES
    from tokext.viz.figures import build_all

    repro = Reproduction("default", results=tmp_path / "results", log=lambda msg: None)
    assert repro.study_sources == COMMITTED_STUDIES
    for name in ("anatomy", "causal"):
        folder = repro.step(name, getattr(repro, name))
        committed = sorted(p.relative_to(COMMITTED_STUDIES[name]) for p in COMMITTED_STUDIES[name].rglob("*"))
        assert committed and all((folder / path).exists() for path in committed), name
    assert repro._model is None  # nothing was run
    out = tmp_path / "figures"
    build_all(repro.root, out)
    for stem in ("fig10_sink_anatomy", "fig11_causal"):
        for suffix in (".png", ".pdf"):
            committed = (REPO / "figures" / f"{stem}{suffix}").read_bytes()
            assert (out / f"{stem}{suffix}").read_bytes() == committed, f"{stem}{suffix} differs from the committed one"
    report, committed_report = (out / "REPORT.md").read_text(), (REPO / "figures" / "REPORT.md").read_text()
    for title in ("Sink anatomy", "Causal tests of sinks"):
        assert _caption(report, title) == _caption(committed_report, title), title


def test_the_committed_studies_are_rerun_when_asked_or_for_another_plan(tmp_path):
    assert Reproduction("default", results=tmp_path, rerun_studies=True).study_sources == {}
    assert Reproduction("quick", results=tmp_path).study_sources == {}
    assert Reproduction("default", results=tmp_path, model="gemma3-270m").study_sources == {}
    assert Reproduction("default", results=tmp_path, anatomy_models=["smollm2-135m"]).study_sources == {}
    missing = {"anatomy": tmp_path / "none", "causal": tmp_path / "none"}
    assert Reproduction("default", results=tmp_path, committed_studies=missing).study_sources == {}


def test_rerun_studies_flag_reaches_the_reproduction(monkeypatch, tmp_path):
    import tokext.studies.reproduce as reproduce
    from tokext.cli import main

    seen = {}

    def fake_run(self, figures):
        seen["sources"] = dict(self.study_sources)
        return Path(figures)

    monkeypatch.setattr(reproduce.Reproduction, "run", fake_run)
    assert main(["reproduce", "--results", str(tmp_path), "--figures", str(tmp_path / "f")]) == 0
    assert set(seen["sources"]) == {"anatomy", "causal"}
    assert main(["reproduce", "--rerun-studies", "--results", str(tmp_path), "--figures", str(tmp_path)]) == 0
    assert seen["sources"] == {}
