"""Step caching of `tokext reproduce`, without a model: cached steps are reused, --force recomputes."""

from __future__ import annotations

import json

from tokext.studies.reproduce import Reproduction


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
