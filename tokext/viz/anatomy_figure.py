"""Figure 10, "sink anatomy", from the sink-anatomy study's results (``<results>/anatomy/``, written by
:func:`tokext.studies.anatomy.run_anatomy`): one column per model, four rows of per-layer and per-head
measurements. Listed in :data:`tokext.viz.figures.BUILDERS`; needs no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokext.viz import plots


def _full_layers(part: pd.DataFrame) -> list[int]:
    """Layers that see every earlier key in a model whose other layers are windowed (Gemma's global layers)."""
    windowed = part["attention"].astype(str).str.contains("window")
    return part.loc[~windowed, "layer"].tolist() if windowed.any() else []


def _mark_full(ax: Any, layers: list[int]) -> None:
    for layer in layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.9", zorder=0, lw=0)


def sink_anatomy(results: Path, out: Path) -> plots.Figure | None:
    """Figure 10: per layer (a) first-token mass and its norm-weighted share, (b) Gu et al.'s norm ratios of
    h, k and v at the first token, (c) Sun et al.'s top |h| / median |h| with the massive activations
    found, (d) per head, head-output norm against first-token mass (inactive heads)."""
    folder = results / "anatomy"
    needed = ["layers.csv", "heads.csv", "inactive.csv", "massive_summary.csv"]
    if not all((folder / name).is_file() for name in needed):
        return None
    import matplotlib.pyplot as plt

    layers = pd.read_csv(folder / "layers.csv")
    heads = pd.read_csv(folder / "heads.csv")
    inactive = pd.read_csv(folder / "inactive.csv").set_index("model")
    massive = pd.read_csv(folder / "massive_summary.csv").set_index("model")
    meta = plots.read_provenance(folder)
    models = list(dict.fromkeys(layers["model"]))
    norm_threshold = float(meta.get("norm_threshold", 0.5))
    first_threshold = float(meta.get("first_threshold", 0.5))
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    fig, axes = plt.subplots(4, len(models), figsize=(plots.FULL_WIDTH, 8.6), squeeze=False, sharey="row")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    runs = meta.get("models") or []
    for column, model in enumerate(models):
        part = layers[layers["model"] == model]
        x = part["layer"].to_numpy()
        full = _full_layers(part)
        mass, ratios, peaks, scatter = axes[:, column]
        for ax in (mass, ratios, peaks):
            _mark_full(ax, full)
            ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (ratios, peaks):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        mass.plot(x, part["first_token_mass"], color="tab:blue", marker="o", ms=2.5, lw=1.2, label="first-token mass")
        mass.plot(
            x,
            part["norm_weighted_first"],
            color="tab:orange",
            marker="s",
            ms=2.5,
            lw=1.2,
            ls="--",
            label="norm-weighted (Kobayashi)",
        )
        mass.set_ylim(0, 1)
        bos = next((str(r.get("bos")) for r in runs if isinstance(r, dict) and r.get("model") == model), "")
        head = f"{model} ({bos.replace(' (tokenizer default)', '')})" if bos else model
        mass.set_title(f"{head}\n(a) attention on the first token, head mean", fontsize=7, loc="left")
        for key, color, label in [
            ("residual_norm_ratio", "tab:red", r"$\|h_0\| / \mathrm{mean}_{t>0}\|h_t\|$"),
            ("key_norm_ratio", "tab:green", r"$\|k_0\| / \mathrm{mean}_{t>0}\|k_t\|$"),
            ("value_norm_ratio", "tab:purple", r"$\|v_0\| / \mathrm{mean}_{t>0}\|v_t\|$"),
        ]:
            ratios.plot(x, part[key], color=color, marker="o", ms=2.5, lw=1.2, label=label)
        ratios.axhline(1.0, color="0.4", lw=0.7, ls=":")
        ratios.set_title("(b) first token's norms over the others' (k, v: head mean)", fontsize=7, loc="left")
        peaks.plot(x, part["top_median_ratio"], color="0.2", marker="o", ms=2.5, lw=1.2, label="top |h| / median |h|")
        peaks.axhline(1000.0, color="tab:red", lw=0.8, ls=":", label="1000x (Sun et al.)")
        found = massive.loc[model] if model in massive.index else None
        if found is not None and int(found["entries"]) > 0:
            first, last = int(found["first_layer"]), int(found["last_layer"])
            dims = str(found["dims"]).split(";")[0].split(":")[0]
            where = f"massive (|h|>100, >=1000x median) in layers {first}-{last}:\n"
            where += (
                f"top dim {dims}, {found['at_position_0_pct']:.0f}% at position 0, max |h| {found['max_abs_value']:.0f}"
            )
            shown = part[part["layer"].isin([int(v) for v in str(found["layers"]).split()])]
            peaks.scatter(shown["layer"], shown["top_median_ratio"], s=18, color="tab:red", zorder=3)
        else:
            where = "no massive activation\n(|h|>100 and >=1000x median)"
        peaks.set_title(f"(c) top |h| / median |h| of block outputs\n{where}", fontsize=6.5, loc="left")
        mine = heads[heads["model"] == model]
        off = mine["inactive_by_norm"].astype(bool)
        picked = mine["selected_by_first_token"].astype(bool)
        scatter.scatter(
            mine.loc[~off, "relative_head_output_norm"],
            mine.loc[~off, "first_token_mass"],
            s=7,
            color="0.55",
            alpha=0.7,
            label="active",
        )
        scatter.scatter(
            mine.loc[off, "relative_head_output_norm"],
            mine.loc[off, "first_token_mass"],
            s=12,
            color="tab:red",
            label="inactive by head-output norm",
        )
        scatter.axvline(norm_threshold, color="tab:red", lw=0.7, ls=":")
        scatter.axhline(first_threshold, color="tab:blue", lw=0.7, ls=":")
        scatter.set_ylim(0, 1)
        scatter.set_xlim(left=0)
        row = inactive.loc[model]
        missed = "" if np.isnan(row["missed_pct"]) else f" ({row['missed_pct']:.0f}%)"
        scatter.set_title(
            f"(d) heads: {int(row['inactive_by_norm'])} of {int(row['heads'])} inactive by norm; first-token\n"
            f"mass >= {first_threshold:g} selects {int(picked.sum())}, misses {int(row['norm_only'])}{missed}",
            fontsize=6.5,
            loc="left",
        )
        scatter.set_xlabel("head-output norm / its layer's mean")
        for ax in (mass, ratios, peaks):
            ax.set_xlabel("layer")
        if column == 0:
            mass.set_ylabel("attention share")
            ratios.set_ylabel("ratio (log)")
            peaks.set_ylabel("ratio (log)")
            scatter.set_ylabel("first-token mass")
        if column == len(models) - 1:
            for ax in (mass, ratios, peaks, scatter):
                ax.legend(frameon=False, fontsize=5.5, loc="best")
    runs = meta.get("models") or []
    bos = ", ".join(f"{r.get('model')}: {r.get('bos_token') or r.get('bos')}" for r in runs if isinstance(r, dict))
    names = " and ".join(models)
    caption = (
        f"Sink anatomy of {names}: {meta.get('n')} rows of natural text (MMLU test questions) of T = "
        f"{meta.get('T')} tokens each (Gu et al. use T = 64), encoded as each tokenizer encodes text (BOS: {bos}), "
        f"statistics of every layer and head collected with norms by the {meta.get('engine')} engine. "
        "(a) head-averaged attention share on the first token and Kobayashi et al.'s norm-weighted share "
        "(A_ij ||v_j W_O^h|| row-normalised); (b) ||h_0|| / mean_{t>0} ||h_t|| of block outputs and the same "
        "ratio for keys (after RoPE / q-k norms) and values; (c) top |h| / median |h| (each averaged over rows) "
        "with the layers where Sun et al.'s massive activations appear in red; (d) each head's output norm "
        f"over its layer's mean against its first-token mass: red heads are inactive by output norm "
        f"(< {norm_threshold:g}); first-token mass >= {first_threshold:g} is the first-token selection. "
        "Grey bands: layers with full (global) attention in a model whose other layers are windowed."
    )
    note = (
        f"models {names} | data natural (MMLU, probe_inputs) | n={meta.get('n')}, T={meta.get('T')}, "
        f"seed {meta.get('seed')} | engine {meta.get('engine')} | git {str(meta.get('git', ''))[:10]} | "
        "experiments/anatomy.py"
    )
    return plots.Figure("fig10_sink_anatomy", "Sink anatomy", caption, plots.save(fig, out, "fig10_sink_anatomy", note))
