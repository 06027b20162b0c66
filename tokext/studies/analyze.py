"""``tokext analyze``: where does attention go in a model, over a prompt set?

Collects streaming statistics, prints a per-layer table, and writes the tidy CSV, the saved
statistics and three figures (first-token mass and entropy by layer and head, received
attention by key position); with ``html``, also the interactive explorer page for the first
``html_prompts`` analysed prompts (:func:`tokext.viz.explorer.explore`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokext.attention.collect import collect_attention_stats
from tokext.errors import InputError
from tokext.models.info import model_info
from tokext.models.loading import DEFAULT_MODEL, load_model
from tokext.evaluation.prompts import load_prompts
from tokext.attention.stats import AttentionStats


@dataclass
class AnalyzeResult:
    stats: AttentionStats
    out_dir: Path
    files: list[Path]
    seconds: float
    html: Path | None = None


def default_out_dir(model_name: str) -> Path:
    """``results/analyze/<model>/`` with the model name made filesystem-safe."""
    return Path("results") / "analyze" / re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)


def analyze(
    model: Any = DEFAULT_MODEL,
    *,
    data: str | Path | None = None,
    n: int | None = 64,
    out: str | Path | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    html: str | Path | None = None,
    html_prompts: int = 16,
) -> AnalyzeResult:
    """Run the attention analysis; ``model`` is a spec for :func:`load_model` or a loaded bridge.

    The prompts are read and checked before the model is loaded, so a bad ``data`` file fails
    at once with a :class:`tokext.errors.DataFileError` instead of after a full model load.
    Returns the statistics, the output directory (``out``, default
    ``results/analyze/<model name>/``), the files written and the collection time in seconds.

    ``html``: also write the explorer page there, for the first ``html_prompts`` prompts, each cut
    to its first ``max_len`` tokens and at most :data:`~tokext.viz.explorer.DEFAULT_MAX_TOKENS`
    (the page holds every head's pattern). A file there that is not an explorer page is an error,
    raised before the model is loaded.
    """
    from tokext.viz.explorer import DEFAULT_MAX_TOKENS, check_page_target, explore

    prompts = load_prompts(data, n)
    if html is not None:
        check_page_target(html)
        if isinstance(html_prompts, bool) or not isinstance(html_prompts, int) or html_prompts < 1:
            raise InputError(f"html_prompts must be a positive integer, got {html_prompts!r}")
    bridge = load_model(model) if isinstance(model, str) else model
    started = time.perf_counter()
    stats = collect_attention_stats(bridge, prompts, batch_size=batch_size, max_len=max_len,
                                    progress=progress, dataset=str(data or "builtin"))
    seconds = time.perf_counter() - started
    info = model_info(bridge)
    out_dir = Path(out) if out is not None else default_out_dir(info.name)
    files = write_outputs(stats, out_dir)
    page = None
    if html is not None:
        tokens = min(max_len, DEFAULT_MAX_TOKENS) if max_len else DEFAULT_MAX_TOKENS
        page = explore(bridge, prompts[:html_prompts], max_tokens=tokens).save(html)
    return AnalyzeResult(stats=stats, out_dir=out_dir, files=files, seconds=seconds, html=page)


def write_outputs(stats: AttentionStats, out_dir: Path) -> list[Path]:
    """Write ``attention_stats.csv``, ``layer_summary.csv``, ``stats.npz`` and the three figures."""
    from tokext.viz import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "attention_stats.csv", out_dir / "layer_summary.csv", out_dir / "stats.npz"]
    stats.to_frame().to_csv(files[0], index=False)
    stats.layer_summary().to_csv(files[1], index=False)
    stats.save(files[2])
    plots.style()
    note = plots.stats_provenance(stats)
    model = stats.metadata.get("model")
    fig = plots.layer_head_heatmap(stats.first_token_mass, stats.layers, label="share of row mass",
                                   title=f"{model}: attention mass on the first token")
    files += plots.save(fig, out_dir, "first_token_mass", note)
    fig = plots.layer_head_heatmap(stats.entropy, stats.layers, label="H / log(#visible keys)", cmap="mako",
                                   title=f"{model}: normalised attention entropy")
    files += plots.save(fig, out_dir, "entropy", note)
    fig = plots.received_by_position(stats.received, stats.layers, plots.pick_layers(stats.layers),
                                     title=f"{model}: received attention by key position")
    files += plots.save(fig, out_dir, "received_by_position", note)
    return files


def format_table(stats: AttentionStats) -> str:
    """The per-layer table printed by ``tokext analyze``."""
    summary = stats.layer_summary()
    lines = [f"{'layer':>5}  {'first-token mass':>16}  {'entropy':>7}  {'sink rate %':>11}"]
    for row in summary.itertuples(index=False):
        lines.append(f"{row.layer:>5}  {row.first_token_mass:>16.3f}  {row.entropy:>7.3f}  {row.sink_rate:>11.1f}")
    lines.append(f"overall sink rate (eps=0.3, position 0): {stats.sink_rate():.1f}% of (layer, head) pairs")
    return "\n".join(lines)
