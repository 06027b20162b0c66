"""experiments/finetune_sinks.py --quick on the tiny Llama model: files, profiles, and the checks it makes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tokext.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _script():
    import tokext.studies.finetune as module

    return module


def test_quick_run_writes_both_profiles(tiny_llama_dir, tmp_path):
    script = _script()
    out = tmp_path / "ft"
    assert script.main(["--quick", "--model", str(tiny_llama_dir), "--out", str(out), "--lr", "1e-2"]) == 0
    for phase in ("before", "after"):
        for dataset in ("task", "natural"):
            assert (out / f"stats_{phase}_{dataset}.npz").is_file()
    profiles = pd.read_csv(out / "profiles.csv")
    assert set(profiles.phase) == {"before", "after"} and set(profiles.dataset) == {"task", "natural"}
    assert {
        "first_token_mass",
        "entropy",
        "mass_punctuation",
        "mass_whitespace",
        "mass_digit",
        "hidden_sinks_per_seq",
    } <= set(profiles.columns)
    changes = pd.read_csv(out / "changes.csv")
    trained = changes.layer == changes.layer.max()  # --quick trains the last layer only
    assert changes.loc[~trained, ["first_token_mass", "entropy"]].abs().to_numpy().max() < 1e-6
    assert changes.loc[trained, ["first_token_mass", "entropy"]].abs().to_numpy().max() > 1e-6  # lr 1e-2 moves it
    log = pd.read_csv(out / "training_log.csv")
    assert list(log.step) == [0, 1, 2, 3] and log.train_loss.notna().all()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["bridge_max_abs_logit_diff"] < 1e-3 and prov["n_trained_parameters"] > 0


def test_bad_settings_fail_before_loading(tmp_path, capsys):
    script = _script()
    assert script.main(["--task", "arithmetc", "--out", str(tmp_path)]) == 2
    assert "unknown task 'arithmetc'" in capsys.readouterr().err
    assert script.main(["--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err
    assert script.main(["--save-dir", str(ROOT / "weights"), "--out", str(tmp_path)]) == 2
    assert "inside the repository" in capsys.readouterr().err
    assert script.main(["--model", "/no/such/model", "--out", str(tmp_path)]) == 2
    assert "/no/such/model" in capsys.readouterr().err
    fake = SimpleNamespace(model=SimpleNamespace(layers=[1, 2]))
    with pytest.raises(InputError, match="train-layers"):
        script.TailModel(fake, 3)
