"""The paper figures, built from saved results only (no model needed): ``tokext figures``.

Each builder reads one results folder written by ``tokext reproduce`` (or the experiments), draws
one figure in :mod:`tokext.viz.plots`' style, stamps its provenance at the foot, writes PNG and PDF,
and returns a :class:`Figure` record whose caption states model, data, n and settings.
:func:`build_all` runs every builder whose inputs exist and writes ``REPORT.md``.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokext.attention.stats import AttentionStats
from tokext.viz import causal_figure, plots
from tokext.viz.anatomy_figure import sink_anatomy
from tokext.viz.plots import Figure

_provenance = plots.read_provenance


def head_patterns(results: Path, out: Path) -> Figure | None:
    """Figure 1: attention patterns of selected heads on one prompt, tokens labelled."""
    path = results / "patterns" / "patterns.npz"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = np.load(path, allow_pickle=False)
    tokens = [str(t) for t in data["tokens"]]
    layers, heads = data["layers"].tolist(), data["heads"].tolist()
    meta = _provenance(results / "patterns")
    cols = len(layers)
    fig, axes = plt.subplots(
        1,
        cols + 1,
        figsize=(plots.FULL_WIDTH, plots.FULL_WIDTH / cols + 0.9),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * cols + [0.05]},
    )
    axes, cax = axes[:, :cols], axes[0][cols]
    labels = [t.replace("\n", "\\n") for t in tokens]
    for ax, layer, head, pattern in zip(axes[0], layers, heads, data["patterns"]):
        sns.heatmap(
            pattern,
            ax=ax,
            cmap="rocket_r",
            vmin=0,
            vmax=1,
            cbar=False,
            square=True,
            xticklabels=labels,
            yticklabels=labels if ax is axes[0][0] else False,
        )
        ax.set_title(f"layer {layer}, head {head}")
        ax.tick_params(labelsize=5.5, length=0)
        ax.set_xlabel("key")
    axes[0][0].set_ylabel("query")
    bar = fig.colorbar(axes[0][-1].collections[0], cax=cax)
    bar.set_label("attention weight", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    caption = (
        f"Attention patterns (post-softmax) of selected heads of {meta.get('model')} on one prompt: an "
        f"early layer spreads attention, downstream layers send most of it to the first token "
        f"({tokens[0]!r}), the sink column. Prompt: {meta.get('prompt')!r}."
    )
    files = plots.save(
        fig, out, "fig1_head_patterns", f"model {meta.get('model')} | one prompt | layers {layers}, heads {heads}"
    )
    return Figure("fig1_head_patterns", "Attention heatmaps of selected heads", caption, files)


def sink_and_entropy(results: Path, out: Path) -> Figure | None:
    """Figure 2: first-token mass and normalised entropy by layer and head."""
    path = results / "analyze" / "stats.npz"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt

    stats = AttentionStats.load(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 3.6))
    plots.layer_head_heatmap(
        stats.first_token_mass, stats.layers, title="mass on the first token", label="share of row mass", ax=left
    )
    plots.layer_head_heatmap(
        stats.entropy,
        stats.layers,
        title="normalised row entropy",
        label="H / log(#visible keys)",
        cmap="mako",
        ax=right,
    )
    note = plots.stats_provenance(stats)
    upper = stats.first_token_mass.mean(1)[3:]
    caption = (
        f"First-token attention mass and normalised entropy per layer and head of {stats.metadata.get('model')} "
        f"over {stats.n_sequences} built-in prompts. Sink rate (alpha_0 > 0.3): {stats.sink_rate():.1f}% of "
        f"(layer, head) pairs; head-averaged first-token mass above 0.4 in {int((upper > 0.4).sum())} of "
        f"{len(upper)} layers from layer 3 on."
    )
    return Figure(
        "fig2_sink_entropy",
        "First-token mass and entropy by layer and head",
        caption,
        plots.save(fig, out, "fig2_sink_entropy", note),
    )


def intervention_profiles(results: Path, out: Path) -> Figure | None:
    """Figure 3: first-token mass and entropy vs layer, one small panel per intervention over the baseline."""
    path = results / "profiles" / "by_layer.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    frame = pd.read_csv(path)
    meta = _provenance(results / "profiles")
    base = frame[frame["intervention"] == "baseline"].sort_values("layer")
    names = [i for i in frame["intervention"].unique() if i != "baseline"]
    cols = 4
    rows = -(-(len(names) + 1) // cols)  # one slot left for the legend
    fig, axes = plt.subplots(
        rows, cols, figsize=(plots.FULL_WIDTH, 1.35 * rows + 0.5), sharex=True, sharey=True, squeeze=False
    )
    mass, entropy = "tab:red", "tab:blue"
    for ax, name in zip(axes.flat, names):
        one = frame[frame["intervention"] == name].sort_values("layer")
        ax.plot(base["layer"], base["first_token_mass"], color="0.7", lw=1.8)
        ax.plot(base["layer"], base["entropy"], color="0.7", lw=1.8, ls="--")
        ax.plot(one["layer"], one["first_token_mass"], color=mass, lw=1)
        ax.plot(one["layer"], one["entropy"], color=entropy, lw=1, ls="--")
        ax.set_title(_label(name, width=30), fontsize=6, pad=2)
        ax.set_ylim(-0.03, 1.03)
        ax.tick_params(labelsize=6, pad=1)
    _bottom_labels(axes, len(names), "layer")
    handles = [
        Line2D([], [], color="0.7", lw=1.8, label="baseline: first-token mass"),
        Line2D([], [], color="0.7", lw=1.8, ls="--", label="baseline: entropy"),
        Line2D([], [], color=mass, lw=1, label="with the intervention: mass"),
        Line2D([], [], color=entropy, lw=1, ls="--", label="with the intervention: entropy"),
    ]
    list(axes.flat)[len(names)].legend(handles=handles, loc="center", frameon=False, fontsize=6)
    fig.supylabel("first-token mass / normalised entropy", fontsize=7)
    caption = (
        f"Layer-wise first-token mass (solid) and normalised entropy (dashed), head-averaged with rows "
        f"renormalised, of {meta.get('model')} on {meta.get('n_prompts')} built-in prompts: one panel per "
        f"intervention at its default settings (colour), over the baseline (grey) repeated in every panel."
    )
    note = f"model {meta.get('model')} | data built-in prompts | n={meta.get('n_prompts')} | interventions at defaults"
    return Figure(
        "fig3_profiles", "Layer-wise profiles under interventions", caption, plots.save(fig, out, "fig3_profiles", note)
    )


def _bottom_labels(axes: Any, used: int, label: str) -> None:
    """In a grid of shared-x panels with ``used`` filled (row-major), hide the empty ones and give the
    lowest panel of each column its x tick labels and ``label``."""
    flat = list(axes.flat)
    for ax in flat[used:]:
        ax.axis("off")
    cols = axes.shape[1]
    for col in range(cols):
        filled = [i for i in range(col, used, cols)]
        if filled:
            flat[filled[-1]].xaxis.set_tick_params(labelbottom=True)
            flat[filled[-1]].set_xlabel(label, fontsize=7)


def _label(name: str, width: int | None = None) -> str:
    """A readable form of an intervention's repr: head lists, ranges and per-head factors spelled briefly;
    with ``width``, the class name on one line and its parameters wrapped below."""
    text = re.sub(
        r"heads=\[\(l, h\) for l in \[(\d+)\] for h in range\((\d+), (\d+)\)\]",
        lambda m: f"layer {m[1]}, heads {m[2]}-{int(m[3]) - 1}",
        name,
    )
    text = re.sub(r"range\((\d+), (\d+)\)", lambda m: f"{m[1]}-{int(m[2]) - 1}", text)
    text = re.sub(r"\((\d+),\)", r"\1", text)
    text = re.sub(r"head_gammas=(\(\(.*?\)\))", lambda m: _gamma_counts(m[1]), text)
    text = text.replace("PatternPatch(source_layer=", "PatternPatch(").replace(", target_layers=", " -> ")
    text = text.replace("AttentionTemperature(temperature=", "AttentionTemperature(")
    if width is None or "(" not in text or text.endswith("()"):
        return text
    head, _, args = text.partition("(")
    return head + "\n" + "\n".join(textwrap.wrap("(" + args, width, break_long_words=False, break_on_hyphens=False))


def _gamma_counts(triples: str) -> str:
    """``((l, h, g), ...)`` as ``n heads x g`` per factor (ZeroTuning's calibrated factors)."""
    import ast

    counts: dict[float, int] = {}
    for *_, gamma in ast.literal_eval(triples):
        counts[gamma] = counts.get(gamma, 0) + 1
    return ", ".join(f"{n} heads x{gamma:g}" for gamma, n in sorted(counts.items(), reverse=True))


def _short(name: str) -> str:
    """One line for an axis label: :func:`_label`, EarlyLayerEmulation written ELE, at most 48 characters."""
    name = _label(name).replace("EarlyLayerEmulation", "ELE")
    return name if len(name) <= 48 else name[:45] + "..."


def _ci_plot(ax: Any, frame: pd.DataFrame, y: str) -> None:
    ypos = np.arange(len(frame))
    ax.errorbar(
        frame["diff"],
        ypos,
        xerr=[frame["diff"] - frame["ci_lo"], frame["ci_hi"] - frame["diff"]],
        fmt="o",
        ms=3,
        lw=1,
        capsize=2,
        color="tab:blue",
    )
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(ypos, frame[y])
    ax.set_xlabel("accuracy difference vs baseline (95% bootstrap CI)")


def ablation(results: Path, out: Path) -> Figure | None:
    """Figure 4: accuracy delta with 95% CI per intervention and task (and per MMLU category)."""
    path = results / "ablation" / "summary.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt

    table = pd.read_csv(path)
    table = table[table["intervention"].fillna("none") != "none"].copy()
    table = table[table["intervention"].notna() & (table["cell_id"] != table["baseline_id"])]
    table["row"] = table["task"] + " L" + table["level"].astype(str) + " | " + table["intervention"].map(_short)
    mmlu_path = results / "mmlu" / "summary.csv"
    panels = [("reasoning tasks", table)]
    if mmlu_path.is_file():
        mmlu = pd.read_csv(mmlu_path)
        mmlu = mmlu[mmlu["cell_id"] != mmlu["baseline_id"]].copy()
        mmlu["row"] = mmlu["level"].astype(str) + " | " + mmlu["intervention"].map(_short)
        panels.append(("MMLU by category", mmlu))
    organism_path = results / "organism_ablation" / "summary.csv"
    if organism_path.is_file():
        org = pd.read_csv(organism_path)
        org = org[org["cell_id"] != org["baseline_id"]].copy()
        org["row"] = org["cot"].map({True: "CoT", False: "direct"}) + " | " + org["intervention"].map(_short)
        panels.append((f"model organism (n={int(org['n_items'].median())} problems per cell)", org))
    heights = [max(1.2, 0.16 * len(t) + 0.6) for _, t in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(plots.FULL_WIDTH, sum(heights) + 0.4),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (title, frame) in zip(axes[:, 0], panels):
        _ci_plot(ax, frame.reset_index(drop=True), "row")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=5.5)
    meta = _provenance(results / "ablation")
    n = int(table["n_items"].median()) if len(table) else 0
    caption = (
        f"Paired accuracy differences (method minus baseline on the same items, 95% bootstrap CI) of "
        f"{meta.get('model', 'the model')} per intervention and task, n={n} items per cell"
        + ("; per MMLU category (letter scoring)" if mmlu_path.is_file() else "")
        + (
            "; and on the 2-layer model organism (its held-out arithmetic, CoT and direct)"
            if organism_path.is_file()
            else ""
        )
        + ". ELE = EarlyLayerEmulation. Exact McNemar p-values are in "
        "the report tables."
    )
    note = f"model {meta.get('model')} | config {meta.get('config')} | n={n}/cell | greedy, {meta.get('shots', 3)}-shot"
    return Figure(
        "fig4_ablation",
        "Ablation: accuracy differences with 95% CI",
        caption,
        plots.save(fig, out, "fig4_ablation", note),
    )


def alpha_sweep(results: Path, out: Path) -> Figure | None:
    """Figure 5: early-layer emulation, alpha vs accuracy difference and loss change with paired 95% CI bands."""
    path = results / "ablation" / "summary.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt

    table = pd.read_csv(path)
    table = table[table["label"].isin(["masked", "uniform"])].copy()
    if table.empty:
        return None
    table["alpha"] = table["params"].map(lambda p: json.loads(p).get("alpha", 0.2))
    cells = list(table.groupby(["task", "level"], sort=True))
    fig, axes = plt.subplots(
        len(cells), 2, figsize=(plots.FULL_WIDTH, 2.0 * len(cells) + 0.5), squeeze=False, sharex=True
    )
    alphas = sorted(table["alpha"].unique())
    colors = {"masked": "tab:blue", "uniform": "tab:orange"}
    panels = [
        ("diff", "ci_lo", "ci_hi", "accuracy difference"),
        ("delta_loss", "dloss_lo", "dloss_hi", "change in answer loss (nats)"),
    ]
    for row, ((task, level), rows) in enumerate(cells):
        for ax, (column, lo, hi, label) in zip(axes[row], panels):
            for name, color in colors.items():
                line = rows[rows["label"] == name].sort_values("alpha")
                if lo in line and line[lo].notna().any():
                    ax.fill_between(line["alpha"], line[lo], line[hi], color=color, alpha=0.18, lw=0)
                ax.plot(
                    line["alpha"], line[column], marker="o", ms=3, lw=1.2, color=color, label=f"{name} (95% CI band)"
                )
            ax.axhline(0, color="0.3", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_ylabel(label)
            n = int(rows["n_items"].median())
            acc = rows["acc_baseline"].dropna()
            base = f", baseline acc {acc.iloc[0]:.3f}" if len(acc) else ""
            ax.set_title(f"{task} level {level} (n={n}{base})", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("alpha")
    axes[0][1].legend(fontsize=6, frameon=False, loc="best")
    meta = _provenance(results / "ablation")
    caption = (
        f"Early-layer emulation on {meta.get('model')}: accuracy difference and change in teacher-forced answer "
        f"loss against alpha ({', '.join(f'{a:g}' for a in alphas)}), masked (the released method) vs uniform "
        f"(the first release's behaviour), each against the baseline on the same items. Bands: paired 95% "
        f"bootstrap intervals over items (10,000 resamples)."
    )
    return Figure(
        "fig5_alpha_sweep",
        "Alpha sweep of early-layer emulation",
        caption,
        plots.save(fig, out, "fig5_alpha_sweep", f"model {meta.get('model')} | config {meta.get('config')}"),
    )


def organism(results: Path, out: Path) -> Figure | None:
    """The model organism: BOS attention during training, and first-token mass by layer and head."""
    folder = results / "organism"
    if not (folder / "stats.npz").is_file():
        return None
    import matplotlib.pyplot as plt

    stats = AttentionStats.load(folder / "stats.npz")
    log = pd.read_csv(folder / "training_log.csv")
    meta = _provenance(folder)
    fig, (left, right) = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 2.4))
    left.plot(log["step"], log["bos_attention"], marker="o", ms=2, lw=1, label="max-head attention to BOS")
    left.plot(log["step"], log["accuracy"], marker="s", ms=2, lw=1, label="held-out accuracy")
    left.set_xlabel("training step")
    left.set_ylabel("accuracy / attention share")
    left.legend(frameon=False)
    plots.layer_head_heatmap(
        stats.first_token_mass, stats.layers, title="first-token mass (trained)", label="share of row mass", ax=right
    )
    accuracy = meta.get("accuracy", {})
    first, last = log.iloc[0], log.iloc[-1]
    caption = (
        f"The model organism (2-layer TransformerLens-native model trained from scratch on CoT arithmetic for "
        f"{meta.get('steps')} steps): held-out exact match CoT {accuracy.get('cot', float('nan')):.3f}, direct "
        f"{accuracy.get('direct', float('nan')):.3f}. Left: held-out accuracy and the largest per-head mean "
        f"attention to BOS during training ({first['bos_attention']:.2f} at step {int(first['step'])}, "
        f"{last['bos_attention']:.2f} at step {int(last['step'])}). Right: first-token mass of the trained model "
        f"per layer and head over {stats.n_sequences} held-out prompts (mean {stats.first_token_mass.mean():.2f})."
    )
    return Figure(
        "fig8_organism",
        "The model organism: accuracy and attention to BOS",
        caption,
        plots.save(
            fig, out, "fig8_organism", f"organism | steps {meta.get('steps')} | seed 0 | n={stats.n_sequences} prompts"
        ),
    )


def computed_tokens(results: Path, out: Path) -> Figure | None:
    """Figure 6: accuracy, answer loss and filler-span attention against the number of filler tokens."""
    paths = sorted((results / "computed_tokens").glob("**/summary.csv"))
    if not paths:
        return None
    import matplotlib.pyplot as plt

    table = pd.read_csv(paths[0])
    meta = _provenance(paths[0].parent)
    filler = table[table["kind"] == "filler"].sort_values("count") if "kind" in table else table
    if filler.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(plots.FULL_WIDTH, 2.3))
    positions = [p for p in filler["position"].unique() if p != "none"] if "position" in filler else [None]
    for style, position in zip(["-", "--", ":", "-."], positions):
        rows = filler[(filler["position"] == position) | (filler["count"] == 0)] if position else filler
        rows = rows.drop_duplicates("count").sort_values("count")
        x = rows["count"].clip(lower=0.5)
        where = f" ({position})" if len(positions) > 1 else ""
        axes[0].plot(x, rows["accuracy"], ls=style, marker="o", ms=3, lw=1, color="tab:blue", label=f"accuracy{where}")
        axes[0].plot(
            x, rows["answer_loss"], ls=style, marker="s", ms=3, lw=1, color="tab:orange", label=f"answer loss{where}"
        )
        axes[1].plot(x, rows["span_mass"], ls=style, marker="o", ms=3, lw=1, color="tab:purple", label=position)
        axes[2].plot(
            x, rows["alpha_filler"], ls=style, marker="o", ms=3, lw=1, color="tab:blue", label=rf"filler keys{where}"
        )
        axes[2].plot(
            x,
            rows["alpha_content"],
            ls=style,
            marker="s",
            ms=3,
            lw=1,
            color="tab:orange",
            label=rf"content keys{where}",
        )
        axes[2].plot(
            x, rows["alpha_first"], ls=style, marker="^", ms=3, lw=1, color="tab:green", label=rf"first token{where}"
        )
    axes[0].set_ylabel("accuracy / loss")
    axes[0].legend(frameon=False, fontsize=5)
    axes[1].set_ylabel("mass on the filler span")
    axes[2].set_ylabel(r"mean received attention $\alpha_k$")
    axes[2].set_yscale("log")
    axes[2].legend(frameon=False, fontsize=5)
    counts = sorted(filler["count"].unique().tolist())
    ticks = [max(c, 0.5) for c in counts]
    for ax in axes:  # one labelled tick per count (log-axis minor labels collide on short ranges)
        ax.set_xscale("log")
        ax.set_xlim(min(ticks) / 1.4, max(ticks) * 1.4)
        ax.set_xticks(ticks, [str(c) for c in counts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel("filler tokens")
    n = int(filler["n"].iloc[0])
    task = f"{filler['task'].iloc[0]} level {filler['level'].iloc[0]}"
    caption = (
        f"Computed tokens on {meta.get('model', 'the model')}: filler tokens ({meta.get('filler', ' .')!r}) inserted "
        f"at position(s) {', '.join(map(str, positions))} of the final question of {task} prompts "
        f"({filler['shots'].iloc[0]}-shot, n={n} per count). Left: "
        f"accuracy and teacher-forced answer loss; middle: share of the later rows' attention on the filler span; "
        f"right: mean received attention of filler keys vs content keys vs the first token (do fillers become sinks?)."
    )
    note = f"model {meta.get('model')} | {task} | n={n}/count | counts {counts} (0 drawn at 0.5 on the log axis)"
    return Figure(
        "fig6_computed_tokens", "Computed-token study", caption, plots.save(fig, out, "fig6_computed_tokens", note)
    )


def finetune(results: Path, out: Path) -> Figure | None:
    """Figure 7: the change (after - before fine-tuning) of the layerwise attention profile, trained layers shaded."""
    path = results / "finetune" / "profiles.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt

    table = pd.read_csv(path)
    meta = _provenance(results / "finetune")
    columns = [
        (c, label)
        for c, label in [
            ("first_token_mass", "first-token mass"),
            ("mass_punctuation", "punctuation mass"),
            ("mass_whitespace", "newline/space mass"),
            ("mass_digit", "digit mass"),
            ("entropy", "normalised entropy"),
        ]
        if c in table
    ]
    keyed = table.set_index(["phase", "dataset", "layer"])
    change = (keyed.loc["after"] - keyed.loc["before"]).reset_index()
    n_layers = int(table["layer"].max()) + 1
    trained = int(meta.get("train_layers") or 0)
    cols = 3
    rows = -(-(len(columns) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(plots.FULL_WIDTH, 1.6 * rows + 0.5), sharex=True, squeeze=False)
    styles = {"task": ("tab:red", "-", "o"), "natural": ("tab:blue", "--", "s")}
    for ax, (column, label) in zip(axes.flat, columns):
        if trained:
            ax.axvspan(n_layers - trained - 0.5, n_layers - 0.5, color="0.88", lw=0, zorder=0)
        ax.axhline(0, color="0.3", lw=0.8)
        for dataset, (color, ls, marker) in styles.items():
            rows_d = change[change["dataset"] == dataset].sort_values("layer")
            ax.plot(rows_d["layer"], rows_d[column], color=color, ls=ls, marker=marker, ms=2, lw=1)
        ax.set_title(f"change in {label}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6, pad=1)
        if 0 < trained < n_layers:  # the frozen layers do not change: show the last few of them for context
            first = max(0, n_layers - trained - 4)
            ax.set_xlim(first - 0.5, n_layers - 0.5)
            ax.set_xticks(range(first, n_layers))
    _bottom_labels(axes, len(columns), "layer")
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Artist] = [
        Line2D(
            [],
            [],
            color=c,
            ls=ls,
            marker=m,
            ms=3,
            lw=1,
            label=f"{d} prompts" if d == "natural" else "held-out task records",
        )
        for d, (c, ls, m) in styles.items()
    ]
    handles.append(Patch(color="0.88", label=f"fine-tuned layers ({n_layers - trained}-{n_layers - 1})"))
    list(axes.flat)[len(columns)].legend(handles=handles, loc="center", frameon=False, fontsize=6)
    fig.supylabel("after - before", fontsize=7)
    frozen = (
        change[change["layer"] < n_layers - trained][[c for c, _ in columns]].abs().to_numpy().max()
        if trained and trained < n_layers
        else float("nan")
    )
    caption = (
        f"Fine-tuning diagnostic (arXiv 2403.14932 v3): {meta.get('model', 'SmolLM2-135M')} fine-tuned for "
        f"{meta.get('steps')} steps on {meta.get('task')} worked solutions, last {trained} layers only (shaded); "
        f"change (after minus before) of the head-averaged attention profile per layer on held-out task records "
        f"and on natural prompts. The frozen layers see the same inputs and do not change (largest |change| in "
        f"layers 0-{n_layers - trained - 1}: {frozen:.1g}); the last four of them are drawn for context."
    )
    note = f"model {meta.get('model')} | task {meta.get('task')} | steps {meta.get('steps')} | lr {meta.get('lr')}"
    return Figure(
        "fig7_finetune",
        "Change of the attention profile with fine-tuning",
        caption,
        plots.save(fig, out, "fig7_finetune", note),
    )


def long_context(results: Path, out: Path) -> Figure | None:
    """Figure 9: first-token mass, entropy and hidden sinks against query position and context length."""
    folder = results / "long_context"
    if not (folder / "layers.csv").is_file() or not (folder / "positions.csv").is_file():
        return None
    import matplotlib.pyplot as plt

    layers = pd.read_csv(folder / "layers.csv")
    positions = pd.read_csv(folder / "positions.csv")
    meta = _provenance(folder)
    trained = meta.get("trained_context")
    lengths = sorted(layers["length"].unique().tolist())
    colors = dict(zip(lengths, plt.cm.viridis(np.linspace(0.0, 0.9, len(lengths)))))

    def line_style(length: int) -> dict[str, Any]:
        beyond = trained is not None and length > trained
        label = f"T={length:,}" + (" (beyond trained)" if beyond else "")
        return {"color": colors[length], "ls": "--" if beyond else "-", "label": label, "lw": 1.1}

    fig, axes = plt.subplots(2, 2, figsize=(plots.FULL_WIDTH, 4.6))
    (by_position, first_by_layer), (entropy_by_layer, sinks) = axes
    rows = positions[positions["rows"] > 0].copy()
    rows["centre"] = np.sqrt(rows["bin_start"].clip(lower=0.5) * rows["bin_stop"].clip(lower=1))
    for length in lengths:
        mine = rows[rows["length"] == length]
        # mean over layers and windows of each bin (every bin of a length has the same query rows)
        curve = mine.groupby("centre", as_index=False)["first_token_mass"].mean()
        by_position.plot(curve["centre"], curve["first_token_mass"], marker="o", ms=2, **line_style(length))
        per_layer = (
            layers[layers["length"] == length].groupby("layer", as_index=False)[["first_token_mass", "entropy"]].mean()
        )
        first_by_layer.plot(per_layer["layer"], per_layer["first_token_mass"], **line_style(length))
        entropy_by_layer.plot(per_layer["layer"], per_layer["entropy"], **line_style(length))
    by_position.set_xscale("log")
    by_position.set_xlabel("query position (log bins)")
    by_position.set_ylabel("first-token mass")
    first_by_layer.set_xlabel("layer")
    first_by_layer.set_ylabel("first-token mass")
    entropy_by_layer.set_xlabel("layer")
    entropy_by_layer.set_ylabel("normalised entropy")
    count = layers.groupby(["length", "window"], as_index=False)["hidden_sinks"].sum()
    mean = count.groupby("length", as_index=False)["hidden_sinks"].mean()
    sinks.plot(mean["length"], mean["hidden_sinks"], color="0.3", lw=1, marker="o", ms=3, label="mean over windows")
    sinks.scatter(count["length"], count["hidden_sinks"], s=8, color="tab:red", zorder=3, label="one text window")
    if trained is not None and max(lengths) > trained:
        sinks.axvspan(trained * 1.0001, max(lengths) * 1.3, color="0.9", zorder=0, label="beyond trained context")
        by_position.axvline(trained, color="0.5", lw=0.8, ls=":")
    sinks.set_xscale("log", base=2)
    sinks.set_xticks(lengths, [f"{length // 1024}k" if length >= 1024 else str(length) for length in lengths])
    sinks.xaxis.set_minor_locator(plt.NullLocator())
    sinks.set_xlabel("context length T")
    sinks.set_ylabel("hidden sinks")
    sinks.legend(frameon=False, fontsize=5)
    first_by_layer.legend(frameon=False, fontsize=5, ncol=2)
    titles = [
        "(a) by query position, mean over layers and heads",
        "(b) by layer, mean over heads and rows",
        "(c) by layer, mean over heads and rows",
        f"(d) ACT hidden sinks (alpha > {meta.get('tau', 0.1)}), summed over layers",
    ]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=7, loc="left")
    windows = meta.get("windows", {})
    trained_text = f"{trained:,}" if trained else "?"
    caption = (
        f"Long context on {meta.get('model')}: one sequence of T tokens of natural text (MMLU test questions in "
        f"file order) per text window ({', '.join(f'T={int(k):,}: {v}' for k, v in windows.items())}), "
        f"statistics of every layer and head collected by the {meta.get('engine', 'streaming')} engine. "
        f"(a) first-token mass against query position, (b) first-token mass and (c) normalised entropy by "
        f"layer, (d) ACT hidden sinks (a key other than the first with mean received attention above "
        f"tau={meta.get('tau', 0.1)}, keys seen by at least {meta.get('min_queries', 64)} queries), summed over "
        f"layers. Dashed / shaded: lengths beyond the "
        f"{trained_text}-token context the model was trained on (run with the n_ctx override)."
    )
    note = (
        f"model {meta.get('model')} | data {meta.get('data')} | engine {meta.get('engine')} | "
        f"trained context {trained} | experiments/long_context.py"
    )
    return Figure(
        "fig9_long_context", "Attention sinks at long context", caption, plots.save(fig, out, "fig9_long_context", note)
    )


def causal_study(results: Path, out: Path) -> Figure | None:
    """Figure 11: the causal study (drawn by :mod:`tokext.viz.causal_figure`)."""
    drawn = causal_figure.draw(results, out)
    return None if drawn is None else Figure(*drawn)


BUILDERS: list[Callable[[Path, Path], Figure | None]] = [
    head_patterns,
    sink_and_entropy,
    intervention_profiles,
    ablation,
    alpha_sweep,
    computed_tokens,
    finetune,
    organism,
    long_context,
    sink_anatomy,
    causal_study,
]


def build_all(results: str | Path, out: str | Path, *, tables: str = "") -> list[Figure]:
    """Run every builder whose inputs exist under ``results``; write figures and ``REPORT.md`` to ``out``."""
    results, out = Path(results), Path(out)
    from tokext.errors import DataFileError

    if not results.is_dir():
        raise DataFileError(f"results directory not found: {results}")
    plots.style()
    figures = [f for f in (builder(results, out) for builder in BUILDERS) if f is not None]
    if not figures:
        raise DataFileError(f"no results to plot under {results} (run `tokext reproduce` first)")
    steps = [
        "analyze",
        "patterns",
        "profiles",
        "ablation",
        "mmlu",
        "organism",
        "organism_ablation",
        "computed_tokens",
        "finetune",
        "long_context",
        "anatomy",
        "causal",
    ]
    done = [s for s in steps if (results / s / "provenance.json").is_file()]
    missing = [s for s in steps if s not in done]
    lines = [
        "# tokext report",
        "",
        f"Built from `{results}` by `tokext figures`. Steps with results: "
        f"{', '.join(done) or 'none'}" + (f"; not run yet: {', '.join(missing)}." if missing else "."),
        "",
    ]
    for number, fig in enumerate(figures, start=1):
        lines += [f"## Figure {number}. {fig.title}", "", f"![{fig.title}]({fig.files[0].name})", "", fig.caption, ""]
    if tables:
        lines += [tables, ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    return figures
