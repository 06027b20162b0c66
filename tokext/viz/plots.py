"""Figures from saved results (no model needed), in one consistent seaborn style.

Every figure carries a provenance line (model, data, n, settings) at its foot and is written as
PNG and PDF at a size readable at paper column width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLUMN_WIDTH = 3.4  # inches, a two-column paper's column
FULL_WIDTH = 7.0
_METADATA = {".png": {"Software": None}, ".pdf": {"CreationDate": None, "Producer": None}}
"""No date and no library version in the files: the same figure is the same bytes."""


@dataclass
class Figure:
    """One written figure: its file stem, title, caption (model, data, n, settings) and files."""

    name: str
    title: str
    caption: str
    files: list[Path]


def read_provenance(folder: Path) -> dict[str, Any]:
    """A results folder's ``provenance.json``, with any nested ``settings`` lifted to the top level."""
    path = folder / "provenance.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    settings = record.get("settings")
    return {**settings, **record} if isinstance(settings, dict) else record


def style() -> None:
    """Apply tokext's plotting style (call before drawing)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import seaborn as sns

    sns.set_theme(
        context="paper",
        style="whitegrid",
        font_scale=0.9,
        rc={
            "figure.dpi": 150,
            "savefig.dpi": 200,
            "axes.titlesize": 9,
            "axes.labelsize": 8,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 7,
        },
    )


def save(fig: Any, out_dir: str | Path, name: str, provenance: str | None = None) -> list[Path]:
    """Write ``fig`` as ``name.png`` and ``name.pdf`` with the provenance line at its foot.

    The PDF carries no creation date, so redrawing the same figure writes the same bytes and a
    rerun of ``tokext reproduce`` leaves committed figures unchanged.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if provenance:
        fig.text(0.01, 0.005, provenance, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if provenance else 0, 1, 1))
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", metadata=_METADATA[path.suffix])
    plt.close(fig)
    return paths


def layer_head_heatmap(
    values: np.ndarray,
    layers: Sequence[int],
    *,
    title: str,
    label: str,
    cmap: str = "rocket_r",
    vmin: float = 0.0,
    vmax: float = 1.0,
    ax: Any = None,
) -> Any:
    """Heatmap of a [layer, head] array: layers on the y axis, heads on the x axis."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        height = max(2.2, 0.12 * len(layers) + 0.8)
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, height))
    sns.heatmap(
        values,
        ax=ax,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        cbar_kws={"label": label},
        yticklabels=[str(layer) if len(layers) <= 16 or i % 2 == 0 else "" for i, layer in enumerate(layers)],
        xticklabels=list(range(values.shape[1])),
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return ax.figure


def received_by_position(
    received: np.ndarray,
    layers: Sequence[int],
    show_layers: Sequence[int],
    *,
    max_position: int = 32,
    title: str = "",
    ax: Any = None,
) -> Any:
    """Line plot of head-averaged alpha_k against key position for a few layers (log y axis)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    palette = sns.color_palette("viridis", len(show_layers))
    for color, layer in zip(palette, show_layers):
        row = np.nanmean(received[list(layers).index(layer)], axis=0)[:max_position]
        ax.plot(np.arange(row.shape[0]), row, marker="o", markersize=2, lw=1, color=color, label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set_xlabel("key position k")
    ax.set_ylabel(r"mean received attention $\alpha_k$")
    ax.set_title(title)
    ax.legend(ncol=2, frameon=False)
    return ax.figure


def pick_layers(layers: Sequence[int], count: int = 4) -> list[int]:
    """Evenly spread layers (first and last included) for line plots."""
    layers = list(layers)
    if len(layers) <= count:
        return layers
    index = np.linspace(0, len(layers) - 1, count).round().astype(int)
    return [layers[i] for i in sorted(set(index))]


def stats_provenance(stats: Any) -> str:
    """The provenance line of a figure drawn from :class:`~tokext.attention.stats.AttentionStats`."""
    meta = stats.metadata
    lengths = meta.get("lengths") or [0]
    return (
        f"model {meta.get('model')} | data {meta.get('dataset')} | n={stats.n_sequences} prompts, "
        f"{min(lengths)}-{max(lengths)} tokens (T varies; uniform alpha_0 ~ H_T/T) | "
        f"BOS prepended: {meta.get('prepend_bos')} | max_len {meta.get('max_len')}"
    )
