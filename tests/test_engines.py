"""Choosing the attention engine (``engine="hooks" | "streaming" | "auto"``) wherever tokext runs a
model: collection, interventions, generation, evaluation, sweep configs and the command line. The
streaming engine's numbers are checked family by family in tests/test_conformance.py; here the
hook engine's results are the independent computation each path is compared with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.models_fixtures import tiny_tokens
from tokext.attention.collect import collect_attention_stats
from tokext.attention.engines import choose_engine
from tokext.errors import DataFileError, InputError
from tokext.evaluation.evaluate import evaluate
from tokext.evaluation.generation import greedy_generate
from tokext.interventions import EarlyLayerEmulation, SinkCalibration, SinkRebalance, intervene, intervention_effect

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_eval):
    return tiny_eval


@pytest.fixture()
def streamed(monkeypatch):
    """How many ``intervene`` blocks ran on the streaming engine (so a test sees the engine was used)."""
    import importlib

    module = importlib.import_module("tokext.interventions.intervene")  # the module, not the function it exports

    count = {"blocks": 0}
    original = module.streaming

    def counting(*args, **kwargs):
        count["blocks"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "streaming", counting)
    return count


def _no_hooks_left(model) -> bool:
    return all(not point.fwd_hooks for point in model.hook_dict.values())


# ---------------------------------------------------------------------- choosing


def test_unknown_engine_is_refused_with_a_suggestion(tiny):
    _, model = tiny
    with pytest.raises(InputError, match="unknown engine 'stream'.*Did you mean 'streaming'"):
        collect_attention_stats(model, tiny_tokens(1, 8), progress=False, engine="stream")
    with pytest.raises(InputError, match="unknown engine"):
        with intervene(model, SinkRebalance(), engine="eager"):
            pass
    assert _no_hooks_left(model)


def test_auto_streams_exactly_when_one_layers_patterns_exceed_the_budget(tiny):
    _, model = tiny
    heads = int(model.cfg.n_heads)
    eager = 2 * heads * 64 * 64 * 8  # scores and probabilities of one layer, fp32, batch 2, T = 64
    assert choose_engine(model, "auto", batch=2, length=64, budget=eager) == "hooks"
    assert choose_engine(model, "auto", batch=2, length=64, budget=eager - 1) == "streaming"
    assert choose_engine(model, "hooks", batch=2, length=64, budget=1) == "hooks"  # asked for: kept


def test_auto_collection_streams_and_matches_the_hook_engine(tiny):
    _, model = tiny
    tokens = tiny_tokens(3, 24)
    hooks = collect_attention_stats(model, tokens, batch_size=3, progress=False)
    auto = collect_attention_stats(model, tokens, batch_size=3, progress=False, engine="auto", budget=20_000)
    assert hooks.metadata["engine"] == "hooks" and auto.metadata["engine"] == "streaming"
    np.testing.assert_allclose(auto.first_token_mass, hooks.first_token_mass, atol=1e-5)
    np.testing.assert_allclose(auto.entropy, hooks.entropy, atol=1e-5)
    np.testing.assert_allclose(np.nan_to_num(auto.received), np.nan_to_num(hooks.received), atol=1e-5)


def test_a_budget_too_small_for_one_query_row_fails_before_any_work(tiny):
    _, model = tiny
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match="budget"):
            collect_attention_stats(model, tiny_tokens(2, 32), progress=False, engine="streaming", budget=64)
        with pytest.raises(InputError, match="budget"):
            with intervene(model, SinkRebalance(), engine="streaming", budget=64, length=32):
                model(tiny_tokens(1, 32))
    finally:
        handle.remove()
    assert not calls, "a layer ran before the budget was refused"
    assert _no_hooks_left(model)


# ---------------------------------------------------------------------- every path that runs a model


def test_intervention_effect_and_generation_agree_across_engines(tiny):
    _, model = tiny
    tokens = tiny_tokens(2, 20, seed=3)
    for iv in (EarlyLayerEmulation(alpha=1.0), SinkCalibration(tau=0.05)):
        hooks = intervention_effect(model, tokens, iv)
        streaming = intervention_effect(model, tokens, iv, engine="streaming")
        assert hooks.max_abs_delta_logit > 1e-3, f"{iv!r} does not move the logits of this model"
        assert streaming.max_abs_delta_logit == pytest.approx(hooks.max_abs_delta_logit, abs=1e-5)
        assert streaming.delta_loss == pytest.approx(hooks.delta_loss, abs=1e-5)
    prompts = [t.tolist() for t in tiny_tokens(2, 9, seed=4)]
    assert greedy_generate(model, prompts, 6, engine="streaming") == greedy_generate(model, prompts, 6)
    with intervene(model, EarlyLayerEmulation(alpha=1.0)):
        hooks = greedy_generate(model, prompts, 6)
    with intervene(model, EarlyLayerEmulation(alpha=1.0), engine="streaming"):
        streaming = greedy_generate(model, prompts, 6)
    assert streaming == hooks


def test_evaluate_gives_the_same_items_with_either_engine(tiny, streamed):
    _, model = tiny
    spec = {"task": "mmlu", "method": "letter", "subjects": ("marketing",), "n": 4}
    hooks = evaluate(model, spec, [EarlyLayerEmulation(alpha=1.0)], batch_size=2, progress=False)
    assert streamed["blocks"] == 0
    streaming = evaluate(
        model, spec, [EarlyLayerEmulation(alpha=1.0)], batch_size=2, progress=False, engine="streaming"
    )
    assert streamed["blocks"] == 1
    numeric = [c for c in hooks.columns if pd.api.types.is_float_dtype(hooks[c])]
    assert numeric, "no scores to compare"
    pd.testing.assert_frame_equal(streaming.drop(columns=numeric), hooks.drop(columns=numeric))
    np.testing.assert_allclose(streaming[numeric].to_numpy(float), hooks[numeric].to_numpy(float), atol=1e-5)
    with pytest.raises(InputError, match="unknown engine"):
        evaluate(model, spec, batch_size=2, progress=False, engine="fast")


# ---------------------------------------------------------------------- sweep configs and the command line


CONFIG = """version = 1
name = "engines"
models = ["MODEL"]
seeds = [0]
batch_size = 2
ENGINE
[[tasks]]
name = "mmlu"
method = "letter"
subjects = ["marketing"]
n = 3

[[tasks]]
name = "arithmetic"
levels = [1]
n = 2
shots = 1
max_new_tokens = 4

[[interventions]]
type = "EarlyLayerEmulation"
alpha = 1.0
"""


def _config(tmp_path, model_dir, engine_line):
    path = tmp_path / f"c{abs(hash(engine_line))}.toml"
    path.write_text(CONFIG.replace("MODEL", model_dir).replace("ENGINE", engine_line))
    return path


def test_config_engine_key_is_checked_and_changes_no_hash(tiny, tmp_path):
    from tokext.studies.config import load_config, with_overrides

    directory, _ = tiny
    plain = load_config(_config(tmp_path, directory, ""))
    streaming = load_config(_config(tmp_path, directory, 'engine = "streaming"'))
    assert plain.engine == "hooks" and streaming.engine == "streaming"
    assert plain.config_hash() == streaming.config_hash()
    with pytest.raises(
        DataFileError, match=r"engine.*expected one of hooks, streaming, auto.*Did you mean 'streaming'"
    ):
        load_config(_config(tmp_path, directory, 'engine = "streming"'))
    assert with_overrides(plain, engine="auto").engine == "auto"
    with pytest.raises(DataFileError, match="--engine"):
        with_overrides(plain, engine="fast")


def test_sweep_with_the_streaming_engine_writes_the_hook_engines_results(tiny, tmp_path, streamed):
    from tokext.studies.sweep import run_sweep

    directory, model = tiny
    tables = {}
    for engine in ("hooks", "streaming"):
        config = _config(tmp_path, directory, f'engine = "{engine}"')
        out = tmp_path / engine
        before = streamed["blocks"]
        run_sweep(config, out, progress=False, loader=lambda spec: model, log=lambda m: None)
        assert (streamed["blocks"] > before) == (engine == "streaming")
        cells = pd.read_csv(out / "cells.csv", dtype={"cell_id": str})
        items = pd.concat([pd.read_csv(f, dtype={"cell_id": str}) for f in sorted((out / "items").glob("*.csv"))])
        tables[engine] = cells, items.reset_index(drop=True)
    (cells_h, items_h), (cells_s, items_s) = tables["hooks"], tables["streaming"]
    assert list(cells_h["cell_id"]) == list(cells_s["cell_id"])  # the engine is not part of a cell's id
    scores = [c for c in ("accuracy", "mean_nll", "mean_loss") if c in cells_h.columns]
    assert scores
    np.testing.assert_allclose(cells_s[scores].to_numpy(float), cells_h[scores].to_numpy(float), atol=1e-5)
    numbers = [c for c in items_h.columns if pd.api.types.is_float_dtype(items_h[c])]
    assert "loss" in numbers
    np.testing.assert_allclose(items_s[numbers].to_numpy(float), items_h[numbers].to_numpy(float), atol=1e-5)
    pd.testing.assert_frame_equal(items_s.drop(columns=numbers), items_h.drop(columns=numbers))


def test_cli_engine_flag(tiny, tmp_path, capsys):
    from tokext.attention.stats import AttentionStats
    from tokext.cli import main

    directory, _ = tiny
    data = tmp_path / "prompts.txt"
    data.write_text("the cat sat on the mat .\nis it raining ? yes , it is .\n")
    assert (
        main(
            [
                "analyze",
                "--model",
                directory,
                "--data",
                str(data),
                "--n",
                "2",
                "--out",
                str(tmp_path / "a"),
                "--engine",
                "streaming",
                "--quiet",
            ]
        )
        == 0
    )
    stats = AttentionStats.load(next((tmp_path / "a").glob("*.npz")))
    assert stats.metadata["engine"] == "streaming"
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--model", directory, "--engine", "fast"])
    assert exit_.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    config = _config(tmp_path, directory, "")
    assert main(["ablate", "--config", str(config), "--engine", "streaming", "--validate"]) == 0
