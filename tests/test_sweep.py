"""tokext.studies.sweep on experiments/tiny.toml with a tiny random Llama: rows, resumption, refusal, paired stats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_evaluate import tiny_eval_model_dir
from tokext.errors import InputError

TINY = Path(__file__).resolve().parent.parent / "experiments" / "tiny.toml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls gain nothing from threads, and on a busy machine lose a lot to spinning."""


def _mmlu_only(interventions: bool = True):
    """The tiny study cut to its MMLU cells (same specs, hence the same cell ids as the full run)."""
    from tokext.studies.config import load_config

    config = load_config(TINY)
    return config.replace(
        tasks=tuple(t for t in config.tasks if t.name == "mmlu"),
        interventions=config.interventions if interventions else (),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokext.models.loading import load_model

    directory = tiny_eval_model_dir(str(tmp_path_factory.mktemp("tiny_eval_sweep")))
    model = load_model(str(directory))
    return str(directory), model


def _run(tiny, out, config=TINY, **kw):
    from tokext.studies.sweep import run_sweep

    name, model = tiny
    kw.setdefault("limit", 3)
    return run_sweep(config, out, models=[name], progress=False, loader=lambda spec: model, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    table = _run(tiny, out)
    return out, table


def test_one_row_per_cell_with_provenance(finished):
    from tokext.studies.sweep import CELL_COLUMNS

    out, table = finished
    assert len(table) == 3 * 4  # (arithmetic direct, cot, mmlu) x (baseline + 3 interventions)
    assert tuple(table.columns) == CELL_COLUMNS
    assert table["cell_id"].is_unique and (table["n_items"] == 3).all()
    assert set(table["intervention"]) == {
        "none",
        "EarlyLayerEmulation()",
        "EarlyLayerEmulation(alpha=1.0)",
        "AttentionTemperature(temperature=2.0)",
    }
    assert table["git_rev"].notna().all() and table["config_hash"].nunique() == 1
    assert table["accuracy"].between(0, 1).all() and table["loss"].notna().all()
    for cid in table["cell_id"]:
        items = pd.read_csv(out / "items" / f"{cid}.csv", dtype={"cell_id": str})
        assert len(items) == 3 and (items["cell_id"] == cid).all()
    base = table[table["label"] == "baseline"].set_index(["task", "cot"])
    for _, row in table.iterrows():
        assert row["baseline_id"] == base.loc[(row["task"], row["cot"]), "cell_id"]
    assert list(out.glob("config-*.toml")) and list(out.glob("config-*.json"))


def test_rerun_skips_finished_cells(tiny, finished):
    out, table = finished
    again = _run(tiny, out)
    pd.testing.assert_frame_equal(table, again)  # same rows, same dates: nothing re-ran


def test_interrupted_sweep_loses_no_rows(tiny, finished, tmp_path, monkeypatch):
    import tokext.evaluation.evaluate as ev

    out = tmp_path / "resume"
    real, calls = ev.evaluate, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    config = _mmlu_only()
    monkeypatch.setattr(ev, "evaluate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, out, config)
    first = pd.read_csv(out / "cells.csv", dtype=str)
    assert len(first) == 2
    monkeypatch.setattr(ev, "evaluate", real)
    table = _run(tiny, out, config)
    rows = pd.read_csv(out / "cells.csv", dtype=str)
    assert len(rows) == len(table) == 4 and rows["cell_id"].is_unique
    pd.testing.assert_frame_equal(rows.iloc[:2].reset_index(drop=True), first)  # finished rows untouched
    reference = finished[1].set_index("cell_id")
    for _, row in table.iterrows():  # the resumed sweep gives the uninterrupted sweep's numbers
        assert row["accuracy"] == reference.loc[row["cell_id"], "accuracy"]
        assert row["loss"] == pytest.approx(reference.loc[row["cell_id"], "loss"], abs=1e-6)


def test_torn_last_row_is_dropped(tiny, finished, tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(finished[0], out)
    text = (out / "cells.csv").read_text()
    lines = text.splitlines(keepends=True)
    (out / "cells.csv").write_text("".join(lines[:-1]) + lines[-1][:40])  # killed mid-write
    table = _run(tiny, out)
    rows = pd.read_csv(out / "cells.csv", dtype=str)
    assert len(rows) == len(table) == 12 and rows["cell_id"].is_unique


def test_other_config_is_refused_unless_forced(tiny, finished, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(finished[0], out)
    config = _mmlu_only(interventions=False)
    with pytest.raises(InputError, match="different config.*--force"):
        _run(tiny, out, config, limit=2)
    table = _run(tiny, out, config, limit=2, force=True)
    assert (table["n_items"] == 2).all() and len(pd.read_csv(out / "cells.csv")) == 13


def test_foreign_csv_is_never_overwritten(tiny, tmp_path):
    from tokext.errors import DataFileError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "cells.csv").write_text("name,score\nalice,3\n")
    with pytest.raises(DataFileError, match="not a tokext sweep results file"):
        _run(tiny, out, force=True)
    assert (out / "cells.csv").read_text() == "name,score\nalice,3\n"


def test_summary_paired_stats_equal_tokext_paired(finished):
    from tokext.studies.paired import paired_summary
    from tokext.studies.sweep import PAIRED_COLUMNS, load_items, summarize

    out, _ = finished
    table = summarize(out, n_boot=2000)
    assert set(PAIRED_COLUMNS) <= set(table.columns) and (out / "summary.csv").is_file()
    row = table[table["label"] != "baseline"].iloc[-1]
    items = load_items(out, [row["baseline_id"], row["cell_id"]])
    b = items[items["cell_id"] == row["baseline_id"]].set_index("id")["correct"]
    m = items[items["cell_id"] == row["cell_id"]].set_index("id")["correct"]
    want = paired_summary(b.to_numpy(bool), m.loc[b.index].to_numpy(bool), n_boot=2000)
    for key, col in (
        ("diff", "diff"),
        ("ci_lo", "ci_lo"),
        ("ci_hi", "ci_hi"),
        ("p_mcnemar", "p_mcnemar"),
        ("n01", "n01"),
        ("n10", "n10"),
        ("acc_baseline", "acc_baseline"),
    ):
        assert row[col] == pytest.approx(want[key]), col
    loss_b = items[items["cell_id"] == row["baseline_id"]].set_index("id")["loss"]
    loss_m = items[items["cell_id"] == row["cell_id"]].set_index("id")["loss"].loc[loss_b.index]
    assert row["dloss_lo"] <= row["delta_loss"] <= row["dloss_hi"]
    assert row["delta_loss"] == pytest.approx(float((loss_m - loss_b).mean()))
    base_rows = table[table["label"] == "baseline"]
    assert (base_rows["diff"] == 0).all() and (base_rows["p_mcnemar"] == 1).all()
    assert (base_rows["dloss_lo"] == 0).all() and (base_rows["dloss_hi"] == 0).all()


def test_cli_ablate_and_validate(tiny, finished, capsys):
    from tokext.cli import main

    assert main(["validate", str(TINY)]) == 0
    assert "valid (12 cells)" in capsys.readouterr().out
    assert main(["ablate", "--config", str(TINY), "--validate", "--limit", "2"]) == 0
    assert main(["ablate", "--summarize", str(finished[0])]) == 0
    assert "EarlyLayerEmulation(alpha=1.0)" in capsys.readouterr().out
    assert main(["validate", str(TINY.parent / "missing.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_cells_are_content_addressed():
    from tokext.evaluation.spec import EvalSpec
    from tokext.interventions import EarlyLayerEmulation
    from tokext.studies.sweep import Cell

    spec = EvalSpec("arithmetic", level=2)
    a = Cell("m", spec, "x", EarlyLayerEmulation(alpha=0.2))
    assert a.id == Cell("m", spec, "other label", EarlyLayerEmulation()).id  # defaults are spelled out
    assert a.id != Cell("m", spec, "x", EarlyLayerEmulation(alpha=0.5)).id
    assert a.baseline_id == Cell("m", spec).id != a.id
    assert len({Cell("m", EvalSpec("arithmetic", level=2, seed=s)).id for s in range(5)}) == 5
    assert np.all([len(c.id) == 12 for c in (a,)])
