"""The sink-anatomy study (tokext.studies.anatomy) on a tiny random Llama (GQA): its per-layer ratios and
inactive-head comparison against an independent computation on plain transformers (forward hooks on the
decoder layers, k_proj / v_proj and o_proj, eager ``output_attentions``), the driver's files and figure,
the reproduce step's resume and caching, and bad plans refused before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tokext.errors import InputError
from tokext.evaluation.probe_inputs import probe_inputs
from tokext.models.loading import load_model
from tokext.studies import anatomy
from tokext.studies.reproduce import Reproduction

ROOT = Path(__file__).resolve().parents[1]
N, T = 5, 16
NORM_THRESHOLD, FIRST_THRESHOLD = 0.97, 0.2  # loose, so a random model has heads on both sides of each


def _oracle(directory: Path, rows: torch.Tensor) -> dict:
    """Per layer the six anatomy measurements and per head the two selections, from transformers alone."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    config = hf.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = config.hidden_size // n_heads
    got: dict[str, dict] = {"h": {}, "k": {}, "v": {}, "z": {}}
    handles = []
    for index, layer in enumerate(hf.model.layers):
        handles.append(
            layer.register_forward_hook(
                lambda m, a, o, i=index: got["h"].__setitem__(i, o[0] if isinstance(o, tuple) else o)
            )
        )
        handles.append(
            layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=index: got["k"].__setitem__(i, o))
        )
        handles.append(
            layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=index: got["v"].__setitem__(i, o))
        )
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=index: got["z"].__setitem__(i, a[0]))
        )
    try:
        with torch.no_grad():
            attentions = hf(rows, output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, list] = {k: [] for k in ("first", "weighted", "h", "top_median", "k", "v", "norm", "mass")}

    def rest(x):
        return x[..., 1:].mean(-1)  # every row has every position here

    for layer, pattern in enumerate(attentions):
        a = pattern.double()  # [row, head, query, key]
        weight = hf.model.layers[layer].self_attn.o_proj.weight.detach().double()  # [d_model, heads x d_head]
        w_o = torch.stack([weight[:, h * d_head : (h + 1) * d_head].T for h in range(n_heads)])  # [head, d_head, d]
        v = got["v"][layer].double().view(N, T, n_kv, d_head).repeat_interleave(n_heads // n_kv, 2)
        k = got["k"][layer].double().view(N, T, n_kv, d_head).repeat_interleave(n_heads // n_kv, 2)
        value_out = torch.linalg.vector_norm(torch.einsum("btnd,nde->btne", v, w_o), dim=-1)  # [row, key, head]
        contribution = a * value_out.permute(0, 2, 1)[:, :, None, :]  # N_ij [row, head, query, key]
        share = contribution / contribution.sum(-1, keepdim=True)
        z = got["z"][layer].double().view(N, T, n_heads, d_head)
        head_out = torch.linalg.vector_norm(torch.einsum("btnd,nde->btne", z, w_o), dim=-1).mean((0, 1))  # [head]
        out["mass"].append(a[..., 0].mean((0, 2)).numpy())  # first-token mass per head
        out["first"].append(a[..., 0].mean().item())
        out["weighted"].append(share[..., 0].mean().item())
        h = got["h"][layer].double()  # [row, T, d_model]
        norm = torch.linalg.vector_norm(h, dim=-1).mean(0)  # [T]
        out["h"].append((norm[0] / rest(norm)).item())
        flat = h.abs().reshape(N, -1)
        top = flat.max(-1).values.mean()
        median = torch.stack([row.median() for row in flat]).mean()  # torch's (lower) median per row
        out["top_median"].append((top / median).item())
        for name, x in (("k", k), ("v", v)):
            per_position = torch.linalg.vector_norm(x, dim=-1).mean((0, 2))  # [T], mean over rows and heads
            out[name].append((per_position[0] / rest(per_position)).item())
        out["norm"].append((head_out / head_out.mean()).numpy())
    return {key: np.array(value) for key, value in out.items()}


@pytest.fixture(scope="module")
def study(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("anatomy") / "anatomy"
    tables = anatomy.run_anatomy(
        out,
        [str(tiny_llama_dir)],
        n=N,
        length=T,
        norm_threshold=NORM_THRESHOLD,
        first_threshold=FIRST_THRESHOLD,
        log=lambda msg: None,
    )
    return out, tables


@pytest.mark.parametrize("engine", ["hooks", "streaming"])
def test_ratios_and_inactive_heads_match_transformers(tiny_llama_dir, tmp_path, engine):
    tables = anatomy.run_anatomy(
        tmp_path / engine,
        [str(tiny_llama_dir)],
        n=N,
        length=T,
        engine=engine,
        norm_threshold=NORM_THRESHOLD,
        first_threshold=FIRST_THRESHOLD,
        probe_results=None,
        log=lambda msg: None,
    )
    rows = probe_inputs(load_model(str(tiny_llama_dir)), "natural", n=N, length=T, seed=0)
    want = _oracle(tiny_llama_dir, rows)
    layers = tables["layers"]
    for column, key in [
        ("first_token_mass", "first"),
        ("norm_weighted_first", "weighted"),
        ("residual_norm_ratio", "h"),
        ("top_median_ratio", "top_median"),
        ("key_norm_ratio", "k"),
        ("value_norm_ratio", "v"),
    ]:
        miss = np.abs(layers[column].to_numpy() / want[key] - 1)
        assert miss.max() < 1e-5, f"{engine} {column}: relative max_diff={miss.max():.2e} at layer {miss.argmax()}"
    heads = tables["heads"]
    off = {(layer, h) for layer, row in enumerate(want["norm"]) for h, r in enumerate(row) if r < NORM_THRESHOLD}
    sunk = {(layer, h) for layer, row in enumerate(want["mass"]) for h, m in enumerate(row) if m >= FIRST_THRESHOLD}
    assert off and sunk and off != sunk, "thresholds chosen so both selections are non-trivial and differ"
    assert set(zip(*heads[heads["inactive_by_norm"]][["layer", "head"]].to_numpy().T)) == off
    assert set(zip(*heads[heads["selected_by_first_token"]][["layer", "head"]].to_numpy().T)) == sunk
    row = tables["inactive"].iloc[0]
    n_heads = len(want["norm"]) * want["norm"].shape[1]
    assert (row["heads"], row["inactive_by_norm"], row["both"]) == (n_heads, len(off), len(off & sunk))
    assert (row["norm_only"], row["first_token_only"]) == (len(off - sunk), len(sunk - off))
    assert row["missed_pct"] == pytest.approx(100 * len(off - sunk) / len(off))


def test_driver_writes_the_tables_provenance_and_figure(tiny_llama_dir, tmp_path):
    out = tmp_path / "results" / "anatomy"
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "anatomy.py"), "--models", str(tiny_llama_dir)]
        + ["--n", "3", "--length", "12", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {"layers.csv", "heads.csv", "inactive.csv", "massive.csv", "massive_summary.csv", "provenance.json"}
    assert names <= {p.name for p in out.iterdir()}
    assert (out / "runs" / f"{anatomy.slug(str(tiny_llama_dir))}.npz").is_file()
    record = json.loads((out / "provenance.json").read_text())
    assert (record["n"], record["T"], record["seed"], record["data"]) == (3, 12, 0, "natural")
    assert record["git"] and record["models"][0]["bos"] and record["models"][0]["n_sequences"] == 3
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 3 * 4  # 3 layers x 4 query heads
    if (ROOT / "experiments" / "results" / "probe_inputs" / "probe_inputs.csv").is_file():
        copied = pd.read_csv(out / "probe_inputs.csv")
        assert copied.equals(pd.read_csv(ROOT / "experiments" / "results" / "probe_inputs" / "probe_inputs.csv"))
    from tokext.viz.figures import sink_anatomy

    figure = sink_anatomy(out.parent, tmp_path / "figures")
    assert [p.name for p in figure.files] == ["fig10_sink_anatomy.png", "fig10_sink_anatomy.pdf"]
    assert "T = 12" in figure.caption and "3 rows of natural text" in figure.caption


def test_massive_summary_by_hand():
    found = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "sequence": [0, 0, 1, 1],
            "layer": [3, 2, 2, 5],
            "position": [0, 0, 0, 7],
            "token": ["<s>", "<s>", "<s>", "."],
            "dim": [9, 9, 9, 4],
            "value": [-300.0, 250.0, 260.0, 120.0],
        }
    )
    row = anatomy.massive_summary(found, {"m": 2, "empty": 4}).set_index("model")
    assert (row.loc["m", "first_layer"], row.loc["m", "last_layer"], row.loc["m", "layers"]) == (2, 5, "2 3 5")
    assert row.loc["m", "dims"] == "9: 3; 4: 1" and row.loc["m", "tokens"] == "'<s>': 3; '.': 1"
    assert row.loc["m", "at_position_0_pct"] == 75.0 and row.loc["m", "max_abs_value"] == 300.0
    assert row.loc["empty", "entries"] == 0 and row.loc["m", "sequences"] == 2


def test_reproduce_step_resumes_and_caches(tiny_llama_dir, tiny_gpt2_dir, tmp_path, monkeypatch):
    from tokext.models import loading

    real, loads, fail = loading.load_model, [], {"gpt2": True}

    def counting(spec, *args, **kwargs):
        loads.append(Path(spec).name)
        if Path(spec).name == Path(tiny_gpt2_dir).name and fail["gpt2"]:
            raise RuntimeError("interrupted")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", counting)
    specs = [str(tiny_llama_dir), str(tiny_gpt2_dir)]

    def make(**kw):
        return Reproduction("quick", results=tmp_path, model=specs[0], anatomy_models=specs, log=lambda m: None, **kw)

    folder = tmp_path / "quick" / "anatomy"
    with pytest.raises(RuntimeError, match="interrupted"):
        make().step("anatomy", make().anatomy)
    assert (folder / "runs" / f"{anatomy.slug(specs[0])}.npz").is_file()  # the first model's run is kept
    assert not (folder / "provenance.json").exists()  # the step is not done
    fail["gpt2"], loads[:] = False, []
    repro = make()
    repro.step("anatomy", repro.anatomy)
    assert loads == [Path(specs[1]).name]  # resumed: only the missing model loaded
    assert (folder / "provenance.json").is_file()
    assert len(pd.read_csv(folder / "layers.csv")["model"].unique()) == 2
    loads[:] = []
    repro = make()
    repro.step("anatomy", repro.anatomy)
    assert loads == []  # cached
    repro = make(force=True)
    repro.step("anatomy", repro.anatomy)
    assert sorted(loads) == sorted(Path(s).name for s in specs)  # --force collects both again


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": []}, "at least one model"),
        ({"models": ["smolm2-135m"]}, "unknown model 'smolm2-135m'"),
        ({"models": ["smollm2-135m", "smollm2-135m"]}, "named twice"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"length": 1}, "length must be an integer >= 2"),
        ({"norm_threshold": float("nan")}, "norm_threshold must be a finite number"),
        ({"first_threshold": -1.0}, "first_threshold must be a finite number"),
        ({"engine": "fast"}, "engine must be"),
    ],
)
def test_bad_plans_are_refused_before_any_model_loads(tmp_path, change, message):
    loaded = []
    plan = {"models": ["smollm2-135m"], "n": 4, "length": 16, **change}
    with pytest.raises(InputError, match=message):
        anatomy.run_anatomy(tmp_path / "out", loader=loaded.append, log=lambda m: None, **plan)
    assert loaded == [] and not (tmp_path / "out").exists()


def test_reproduction_checks_its_anatomy_models_up_front(tmp_path):
    with pytest.raises(InputError, match="unknown model 'gemma-3'"):
        Reproduction("quick", results=tmp_path, anatomy_models=["smollm2-135m", "gemma-3"], log=lambda m: None)
