"""The paper figures, built from saved results only (no model needed): ``tokext figures``.

Each builder reads one results folder written by ``tokext reproduce`` (or the experiments), draws
one figure in :mod:`tokext.viz.plots`' style, stamps its provenance at the foot, writes PNG and PDF,
and returns a :class:`Figure` record whose caption states model, data, n and settings.
:func:`build_all` runs every builder whose inputs exist and writes ``REPORT.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tokext.viz import plots
from tokext.attention.stats import AttentionStats


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    files: list[Path]


def _provenance(folder: Path) -> dict[str, Any]:
    """A step's provenance record, with any nested ``settings`` lifted to the top level."""
    path = folder / "provenance.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    settings = record.get("settings")
    return {**settings, **record} if isinstance(settings, dict) else record


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
    fig, axes = plt.subplots(1, cols, figsize=(plots.FULL_WIDTH, plots.FULL_WIDTH / cols + 0.9), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for ax, layer, head, pattern in zip(axes[0], layers, heads, data["patterns"]):
        sns.heatmap(pattern, ax=ax, cmap="rocket_r", vmin=0, vmax=1, cbar=False, square=True,
                    xticklabels=labels, yticklabels=labels if ax is axes[0][0] else False)
        ax.set_title(f"layer {layer}, head {head}")
        ax.tick_params(labelsize=4.5, length=0)
        ax.set_xlabel("key")
    axes[0][0].set_ylabel("query")
    caption = (f"Attention patterns (post-softmax) of selected heads of {meta.get('model')} on one prompt: an "
               f"early layer spreads attention, downstream layers send most of it to the first token "
               f"({tokens[0]!r}), the sink column. Prompt: {meta.get('prompt')!r}.")
    files = plots.save(fig, out, "fig1_head_patterns", f"model {meta.get('model')} | one prompt | layers {layers}, heads {heads}")
    return Figure("fig1_head_patterns", "Attention heatmaps of selected heads", caption, files)


def sink_and_entropy(results: Path, out: Path) -> Figure | None:
    """Figure 2: first-token mass and normalised entropy by layer and head."""
    path = results / "analyze" / "stats.npz"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt

    stats = AttentionStats.load(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 3.6))
    plots.layer_head_heatmap(stats.first_token_mass, stats.layers, title="mass on the first token",
                             label="share of row mass", ax=left)
    plots.layer_head_heatmap(stats.entropy, stats.layers, title="normalised row entropy",
                             label="H / log(#visible keys)", cmap="mako", ax=right)
    note = plots.stats_provenance(stats)
    upper = stats.first_token_mass.mean(1)[3:]
    caption = (f"First-token attention mass and normalised entropy per layer and head of {stats.metadata.get('model')} "
               f"over {stats.n_sequences} built-in prompts. Sink rate (alpha_0 > 0.3): {stats.sink_rate():.1f}% of "
               f"(layer, head) pairs; head-averaged first-token mass above 0.4 in {int((upper > 0.4).sum())} of "
               f"{len(upper)} layers from layer 3 on.")
    return Figure("fig2_sink_entropy", "First-token mass and entropy by layer and head", caption,
                  plots.save(fig, out, "fig2_sink_entropy", note))


def intervention_profiles(results: Path, out: Path) -> Figure | None:
    """Figure 3: sink mass and entropy vs layer, baseline vs each intervention."""
    path = results / "profiles" / "by_layer.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = pd.read_csv(path)
    frame["intervention"] = frame["intervention"].map(_short)
    meta = _provenance(results / "profiles")
    fig, axes = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 3.0), sharex=True)
    order = ["baseline"] + [i for i in frame["intervention"].unique() if i != "baseline"]
    palette = dict(zip(order, ["black"] + sns.color_palette("tab10", len(order) - 1)))
    for ax, column, label in zip(axes, ["first_token_mass", "entropy"], ["first-token mass", "normalised entropy"]):
        sns.lineplot(frame, x="layer", y=column, hue="intervention", hue_order=order, palette=palette, ax=ax,
                     lw=1, legend=ax is axes[1])
        ax.set_ylabel(label)
    axes[1].legend(fontsize=5, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    caption = (f"Layer-wise first-token mass and entropy (head-averaged; rows renormalised) of {meta.get('model')} "
               f"with each intervention at its default settings, on {meta.get('n_prompts')} built-in prompts.")
    note = f"model {meta.get('model')} | data built-in prompts | n={meta.get('n_prompts')} | interventions at defaults"
    return Figure("fig3_profiles", "Layer-wise profiles under interventions", caption,
                  plots.save(fig, out, "fig3_profiles", note))


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def _ci_plot(ax: Any, frame: pd.DataFrame, y: str) -> None:
    ypos = np.arange(len(frame))
    ax.errorbar(frame["diff"], ypos, xerr=[frame["diff"] - frame["ci_lo"], frame["ci_hi"] - frame["diff"]],
                fmt="o", ms=3, lw=1, capsize=2, color="tab:blue")
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
    fig, axes = plt.subplots(len(panels), 1, figsize=(plots.FULL_WIDTH, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, frame) in zip(axes[:, 0], panels):
        _ci_plot(ax, frame.reset_index(drop=True), "row")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=5.5)
    meta = _provenance(results / "ablation")
    n = int(table["n_items"].median()) if len(table) else 0
    caption = (f"Paired accuracy differences (method minus baseline on the same items, 95% bootstrap CI) of "
               f"{meta.get('model', 'the model')} per intervention and task, n={n} items per cell"
               + ("; per MMLU category (letter scoring)" if mmlu_path.is_file() else "")
               + ("; and on the 2-layer model organism (its held-out arithmetic, CoT and direct)"
                  if organism_path.is_file() else "") + ". Exact McNemar p-values are in the report tables.")
    note = f"model {meta.get('model')} | config {meta.get('config')} | n={n}/cell | greedy, {meta.get('shots', 3)}-shot"
    return Figure("fig4_ablation", "Ablation: accuracy differences with 95% CI", caption,
                  plots.save(fig, out, "fig4_ablation", note))


def alpha_sweep(results: Path, out: Path) -> Figure | None:
    """Figure 5: early-layer emulation, alpha vs accuracy difference and loss change, masked vs uniform."""
    path = results / "ablation" / "summary.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = pd.read_csv(path)
    table = table[table["label"].isin(["masked", "uniform"])].copy()
    if table.empty:
        return None
    table["alpha"] = table["params"].map(lambda p: json.loads(p).get("alpha", 0.2))
    fig, axes = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 2.6))
    for ax, column, label in zip(axes, ["diff", "delta_loss"], ["accuracy difference", "change in answer loss"]):
        sns.lineplot(table, x="alpha", y=column, hue="label", style="task", markers=True, ax=ax, lw=1,
                     legend=ax is axes[1])
        ax.set_xscale("log")
        ax.axhline(0, color="0.3", lw=0.8, ls="--")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=6, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    meta = _provenance(results / "ablation")
    caption = (f"Early-layer emulation on {meta.get('model')}: accuracy difference and change in teacher-forced answer "
               f"loss against alpha, masked (the released method) vs uniform (the first release's behaviour).")
    return Figure("fig5_alpha_sweep", "Alpha sweep of early-layer emulation", caption,
                  plots.save(fig, out, "fig5_alpha_sweep", f"model {meta.get('model')} | config {meta.get('config')}"))


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
    left.legend(frameon=False)
    plots.layer_head_heatmap(stats.first_token_mass, stats.layers, title="first-token mass (trained)",
                             label="share of row mass", ax=right)
    accuracy = meta.get("accuracy", {})
    caption = (f"The model organism (2-layer TransformerLens-native model trained from scratch on CoT arithmetic for "
               f"{meta.get('steps')} steps): held-out exact match CoT {accuracy.get('cot', float('nan')):.3f}, direct "
               f"{accuracy.get('direct', float('nan')):.3f}; attention to the BOS token grows during training. Heatmap: "
               f"first-token mass over {stats.n_sequences} held-out prompts.")
    return Figure("fig8_organism", "The model organism grows a BOS sink", caption,
                  plots.save(fig, out, "fig8_organism", f"organism | steps {meta.get('steps')} | seed 0 | n={stats.n_sequences} prompts"))


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
        axes[0].plot(x, rows["answer_loss"], ls=style, marker="s", ms=3, lw=1, color="tab:orange", label=f"answer loss{where}")
        axes[1].plot(x, rows["span_mass"], ls=style, marker="o", ms=3, lw=1, color="tab:purple", label=position)
        axes[2].plot(x, rows["alpha_filler"], ls=style, marker="o", ms=3, lw=1, color="tab:blue", label=rf"filler keys{where}")
        axes[2].plot(x, rows["alpha_content"], ls=style, marker="s", ms=3, lw=1, color="tab:orange", label=rf"content keys{where}")
        axes[2].plot(x, rows["alpha_first"], ls=style, marker="^", ms=3, lw=1, color="tab:green", label=rf"first token{where}")
    axes[0].set_ylabel("accuracy / loss")
    axes[0].legend(frameon=False, fontsize=5)
    axes[1].set_ylabel("mass on the filler span")
    axes[2].set_ylabel(r"mean received attention $\alpha_k$")
    axes[2].set_yscale("log")
    axes[2].legend(frameon=False, fontsize=5)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("filler tokens (0 plotted at 0.5)")
    n = int(filler["n"].iloc[0])
    task = f"{filler['task'].iloc[0]} level {filler['level'].iloc[0]}"
    caption = (f"Computed tokens on {meta.get('model', 'the model')}: filler tokens ({meta.get('filler', ' .')!r}) inserted "
               f"at position(s) {', '.join(map(str, positions))} of the final question of {task} prompts ({filler['shots'].iloc[0]}-shot, n={n} per count). Left: "
               f"accuracy and teacher-forced answer loss; middle: share of the later rows' attention on the filler span; "
               f"right: mean received attention of filler keys vs content keys vs the first token (do fillers become sinks?).")
    note = f"model {meta.get('model')} | {task} | n={n}/count | counts {sorted(filler['count'].unique().tolist())}"
    return Figure("fig6_computed_tokens", "Computed-token study", caption, plots.save(fig, out, "fig6_computed_tokens", note))


def finetune(results: Path, out: Path) -> Figure | None:
    """Figure 7: layerwise sink and token-category profile before vs after fine-tuning."""
    path = results / "finetune" / "profiles.csv"
    if not path.is_file():
        return None
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = pd.read_csv(path)
    meta = _provenance(results / "finetune")
    columns = [("first_token_mass", "first-token mass"), ("mass_punctuation", "punctuation mass"),
               ("mass_whitespace", "newline/space mass"), ("entropy", "entropy")]
    fig, axes = plt.subplots(1, len(columns), figsize=(plots.FULL_WIDTH, 2.4), sharex=True)
    for ax, (column, label) in zip(axes, columns):
        sns.lineplot(table, x="layer", y=column, hue="phase", style="dataset", ax=ax, lw=1,
                     legend=ax is axes[-1], palette={"before": "tab:blue", "after": "tab:red"})
        ax.set_ylabel(label)
    axes[-1].legend(fontsize=5.5, frameon=False, bbox_to_anchor=(1.02, 1), loc="upper left")
    caption = (f"Fine-tuning diagnostic (arXiv 2403.14932 v3): {meta.get('model', 'SmolLM2-135M')} fine-tuned for "
               f"{meta.get('steps')} steps on {meta.get('task')} worked solutions (last {meta.get('train_layers')} layers); "
               f"attention profile per layer before vs after on held-out task records and on natural prompts.")
    note = f"model {meta.get('model')} | task {meta.get('task')} | steps {meta.get('steps')} | lr {meta.get('lr')}"
    return Figure("fig7_finetune", "Sink profile before vs after fine-tuning", caption, plots.save(fig, out, "fig7_finetune", note))


BUILDERS: list[Callable[[Path, Path], Figure | None]] = [
    head_patterns, sink_and_entropy, intervention_profiles, ablation, alpha_sweep, computed_tokens, finetune,
    organism,
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
    steps = ["analyze", "patterns", "profiles", "ablation", "mmlu", "organism", "organism_ablation", "computed_tokens",
             "finetune"]
    done = [s for s in steps if (results / s / "provenance.json").is_file()]
    missing = [s for s in steps if s not in done]
    lines = ["# tokext report", "", f"Built from `{results}` by `tokext figures`. Steps with results: "
             f"{', '.join(done) or 'none'}" + (f"; not run yet: {', '.join(missing)}." if missing else "."), ""]
    for number, fig in enumerate(figures, start=1):
        lines += [f"## Figure {number}. {fig.title}", "", f"![{fig.title}]({fig.files[0].name})", "", fig.caption, ""]
    if tables:
        lines += [tables, ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    return figures
