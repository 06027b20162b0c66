"""ZeroTuning beyond its formula (tests/test_interventions_reference.py checks that): its relation to
SinkRebalance, and its calibration against the procedure written out, on a toy objective whose
optimum is known, and on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from tests.models_fixtures import tiny_llama, tiny_native  # noqa: F401  (fixtures)
from tests.test_interventions_reference import _left_padded_batch
from tokext.errors import InputError, LayerIndexError
from tokext.interventions.intervene import intervene
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.zerotuning import ZeroTuning, calibrate_zerotuning
from tokext.models.hooks import attached, pattern_hook_name


def _tokens(model, n=3, length=10, seed=0):
    return torch.randint(3, int(model.cfg.d_vocab), (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gamma", [0.3, 2.5])
def test_one_factor_on_every_head_is_sink_rebalance_of_the_first_token(tiny_llama, gamma):
    tokens, mask = _left_padded_batch()
    with torch.no_grad():
        with intervene(tiny_llama, ZeroTuning(gamma=gamma)):
            ours = tiny_llama(tokens, attention_mask=mask)
        with intervene(tiny_llama, SinkRebalance("first", scale=gamma)):
            rebalanced = tiny_llama(tokens, attention_mask=mask)
    real = mask.bool()
    assert float((ours - rebalanced).abs()[real].max()) < 1e-6


def test_validation_against_the_model(tiny_native):
    cases = [
        (ZeroTuning(head_gammas=[(3, 0, 2.0)]), LayerIndexError, r"head_gammas: layer 3 .*0\.\.2"),
        (ZeroTuning(head_gammas=[(0, 4, 2.0)]), LayerIndexError, r"head_gammas: head 4 .*0\.\.3"),
        (
            ZeroTuning(gamma=2.0, layers=(0,), head_gammas=[(0, h, 1.0) for h in range(4)]),
            InputError,
            "nothing to edit",
        ),
    ]
    for iv, error, message in cases:
        with pytest.raises(error, match=message), intervene(tiny_native, iv):
            pass
    bad = [
        dict(),
        dict(gamma=0.0),
        dict(gamma=-1.0),
        dict(gamma=float("nan")),
        dict(gamma=1.0, layers=(1,)),
        dict(head_gammas=[(0, 1)]),
        dict(head_gammas=[(0, 1, 0.0)]),
        dict(head_gammas=[(0, 1, 2.0), (0, 1, 3.0)]),
        dict(head_gammas=[]),
        dict(head_gammas=[(0, 1, 1.0)]),
        dict(head_gammas=[(0.5, 1, 2.0)]),
        dict(head_gammas=5),
    ]
    for kwargs in bad:
        with pytest.raises(InputError):
            ZeroTuning(**kwargs)


def _first_mass(model, tokens, layer, head):
    """Mean attention head (layer, head) gives the first token, as the pattern leaves the hook chain."""
    seen = {}

    def keep(pattern, hook):
        seen["mass"] = float(pattern[:, head, :, 0].mean())

    with attached(model, [(pattern_hook_name(layer), keep)]):
        model(tokens)
    return seen["mass"]


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_calibration_finds_the_optimum_of_a_toy_objective(tiny_native, sign):
    """The objective depends only on head (1, 0)'s first-token mass: minus it (more is better) or it
    (less is better). Head (2, 1) cannot change layer 1, so it is neither up- nor down-effective."""
    model, tokens = tiny_native, _tokens(tiny_native)

    def score(m):
        return sign * _first_mass(m, tokens, 1, 0)

    result = calibrate_zerotuning(model, score, candidates=[(1, 0), (2, 1)])
    with torch.no_grad():
        baseline = score(model)
    assert result.baseline == pytest.approx(baseline, abs=1e-7)
    assert result.profile[(2, 1)] == pytest.approx(baseline, abs=1e-7)
    best_gamma = 4.0 if sign < 0 else 0.25  # the largest factor raises the mass most, the smallest lowers it most
    assert result.up == (((1, 0),) if sign < 0 else ())
    assert result.down == (() if sign < 0 else ((1, 0),))
    assert result.head_gammas == ((1, 0, best_gamma),)
    with torch.no_grad(), intervene(model, result.intervention()):
        tuned = score(model)
    assert result.best == pytest.approx(tuned, abs=1e-7) and tuned < baseline - 1e-3


def test_calibration_matches_the_procedure_written_out(tiny_native):
    """Profiling, typing and the factor grid against direct computations of TransformerLens's own loss."""
    model, tokens = tiny_native, _tokens(tiny_native, n=2, length=12, seed=1)
    candidates = [(0, 0), (0, 3), (1, 1), (2, 2)]

    def loss(*ivs):
        with torch.no_grad(), intervene(model, *ivs):
            return float(model(tokens, return_type="loss"))

    result = calibrate_zerotuning(
        model,
        lambda m: float(m(tokens, return_type="loss")),
        candidates=candidates,
        probe=3.0,
        up_gammas=(2.0,),
        down_gammas=(0.5, 0.2),
        min_gain=1e-4,
    )
    baseline = loss()
    assert result.baseline == pytest.approx(baseline, abs=1e-6)
    profile = {pair: loss(ZeroTuning(head_gammas=[(*pair, 3.0)])) for pair in candidates}
    for pair in candidates:
        assert result.profile[pair] == pytest.approx(profile[pair], abs=1e-6)
    assert result.up == tuple(p for p in candidates if profile[p] < baseline - 1e-4)
    assert result.down == tuple(p for p in candidates if profile[p] > baseline + 1e-4)
    assert result.up and result.down, "this seed should give both kinds of head"
    expected = {}
    for g_up in (1.0, 2.0):
        for g_down in (1.0, 0.5, 0.2):
            if (g_up, g_down) == (1.0, 1.0):
                continue
            triples = [(*p, g_up) for p in result.up if g_up != 1] + [(*p, g_down) for p in result.down if g_down != 1]
            expected[(g_up, g_down)] = loss(ZeroTuning(head_gammas=triples))
    assert set(result.grid) == set(expected)
    for key, value in expected.items():
        assert result.grid[key] == pytest.approx(value, abs=1e-6), key
    best = min(expected, key=expected.get)
    if expected[best] < baseline - 1e-4:
        assert result.best == pytest.approx(expected[best], abs=1e-6)
        assert result.intervention() == ZeroTuning(head_gammas=result.head_gammas)
        assert {g for *_, g in result.head_gammas} <= {best[0], best[1]}
    else:
        assert result.head_gammas == () and result.best == result.baseline
        with pytest.raises(InputError, match="nothing to tune"):
            result.intervention()


def test_calibration_refuses_bad_input_before_any_forward_pass(tiny_native):
    calls = []

    def score(m):
        calls.append(1)
        return 0.0

    bad = [
        (dict(probe=1.0), "probe"),
        (dict(probe=0.5), "probe"),
        (dict(up_gammas=(0.5,)), "up_gammas"),
        (dict(up_gammas=()), "up_gammas"),
        (dict(down_gammas=(1.5,)), "down_gammas"),
        (dict(down_gammas=(0.5, 0.5)), "twice"),
        (dict(candidates=[(0, 0), (0, 0)]), "twice"),
        (dict(candidates=[(3, 0)]), "layer 3"),
        (dict(candidates=[(0,)]), "pairs"),
        (dict(min_gain=-1.0), "min_gain"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InputError, match=message):
            calibrate_zerotuning(tiny_native, score, **kwargs)
    with pytest.raises(InputError, match="callable"):
        calibrate_zerotuning(tiny_native, "loss")
    assert not calls
    with pytest.raises(InputError, match="finite"):
        calibrate_zerotuning(tiny_native, lambda m: math.nan, candidates=[(0, 0)])


def _driver():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "zerotuning_calibrate.py"
    spec = importlib.util.spec_from_file_location("zerotuning_calibrate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_driver_writes_a_record_that_reproduces_its_score(tiny_llama_dir, tmp_path, capsys):
    import json

    from tokext.evaluation.objectives import gold_answer_nll
    from tokext.evaluation.spec import EvalSpec
    from tokext.models.loading import load_model

    driver, out = _driver(), tmp_path / "zt"
    argv = [
        "--model",
        str(tiny_llama_dir),
        "--levels",
        "1",
        "--n",
        "2",
        "--study-n",
        "4",
        "--shots",
        "0",
        "--layers",
        "0",
        "--objectives",
        "supervised",
        "--out",
        str(out),
    ]
    assert driver.main(argv) == 0
    record = json.loads((out / "supervised.json").read_text())
    assert record["study_overlap"] == {"1": 0} and record["n_per_level"] == 2 and len(record["profile"]) == 4
    spec = EvalSpec("lookup", level=1, n=2, seed=1, shots=0)
    model = load_model(str(tiny_llama_dir))
    best = record["baseline"]
    if record["head_gammas"]:
        with torch.no_grad(), intervene(model, ZeroTuning(head_gammas=record["head_gammas"])):
            best = gold_answer_nll(spec)(model)
    assert record["best"] == pytest.approx(best, abs=1e-6)
    assert driver.main(argv) == 0 and "done already" in capsys.readouterr().out  # a finished objective is kept
    with pytest.raises(InputError, match="unknown objectives"):
        driver.main(argv[:-4] + ["--objectives", "accuracy", "--out", str(out)])
