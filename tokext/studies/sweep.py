"""Run a sweep config cell by cell, writing each finished cell at once; then paired statistics.

A cell is one model x one :class:`tokext.studies.config.EvalSpec` (task, level or category, method, cot,
seed) x one intervention (or none: the baseline, always included). Its id is a hash of its full
spec, so a rerun skips the cells already in ``cells.csv``, and an interrupted sweep loses only the
cell in flight. Layout of the results directory::

    cells.csv               one row per finished cell (accuracy, loss, n_items, seconds, provenance)
    items/<cell_id>.csv     one row per item (id, correct, loss, extracted answer, raw text, ...)
    config-<hash>.toml      the config that wrote the rows (and .json: its resolved form)
    summary.csv             written by summarize(): each cell against its baseline on the same items

A directory whose ``cells.csv`` was written by another config is refused unless ``force=True``
(then finished cells whose id still matches are reused, and the rest appended; nothing is deleted).

Cells run on an executor (:mod:`tokext.studies.executors`): in this process one after another
(``serial``, the default) or on a Ray cluster (``ray``); this module stays the only writer of
results either way, so the layout above does not depend on where the cells ran.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tokext.errors import DataFileError, InputError
from tokext.evaluation.spec import EvalSpec
from tokext.studies.config import DEFAULT_DTYPE, StudyConfig, canonical_json, load_config, validate

CELL_COLUMNS = (
    "cell_id",
    "baseline_id",
    "config_hash",
    "study",
    "model",
    "task",
    "method",
    "level",
    "cot",
    "seed",
    "shots",
    "n_items",
    "label",
    "intervention",
    "params",
    "accuracy",
    "acc_norm",
    "loss",
    "n_correct",
    "seconds",
    "git_rev",
    "tokext_version",
    "date",
    "spec",
)
PAIRED_COLUMNS = (
    "acc_baseline",
    "diff",
    "ci_lo",
    "ci_hi",
    "p_mcnemar",
    "n01",
    "n10",
    "n_paired",
    "loss_baseline",
    "delta_loss",
    "dloss_lo",
    "dloss_hi",
)
BASELINE = "baseline"


@dataclass(frozen=True)
class Cell:
    """One unit of work; ``intervention`` is ``None`` for the baseline. ``dtype`` is part of the id
    unless it is the default float32 (so the ids of float32 cells are what they always were)."""

    model: str
    spec: EvalSpec
    label: str = BASELINE
    intervention: Any = None
    dtype: str = DEFAULT_DTYPE

    @property
    def params(self) -> dict[str, Any]:
        return {} if self.intervention is None else dataclasses.asdict(self.intervention)

    @property
    def id(self) -> str:
        kind = None if self.intervention is None else type(self.intervention).__name__
        key = {"model": self.model, "spec": self.spec.to_dict(), "intervention": kind, "params": self.params}
        if self.dtype != DEFAULT_DTYPE:
            key["dtype"] = self.dtype
        return hashlib.sha1(canonical_json(key).encode()).hexdigest()[:12]

    @property
    def baseline_id(self) -> str:
        return Cell(self.model, self.spec, dtype=self.dtype).id

    @property
    def intervention_repr(self) -> str:
        return "none" if self.intervention is None else repr(self.intervention)


def expand(config: StudyConfig) -> list[Cell]:
    """Every cell of ``config``: per model and eval spec, the baseline then each intervention."""
    ivs = config.expanded_interventions()
    return [
        cell
        for model in config.models
        for spec in config.eval_specs()
        for cell in [Cell(model, spec, dtype=config.dtype)]
        + [Cell(model, spec, label, iv, config.dtype) for label, iv in ivs]
    ]


def with_limit(config: StudyConfig, limit: int | None) -> StudyConfig:
    """``config`` with at most ``limit`` items per cell (a different config, so a different hash)."""
    if limit is None:
        return config
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    tasks = tuple(dataclasses.replace(t, n=min(t.n, limit) if t.n is not None else limit) for t in config.tasks)
    return config.replace(tasks=tasks)


def default_out_dir(config: StudyConfig, limit: int | None = None) -> Path:
    return Path("results") / "ablate" / (config.name + (f"-limit{limit}" if limit else ""))


# ---------------------------------------------------------------------- provenance and files


def git_revision() -> str:
    """The short commit of the tokext checkout, ``+dirty`` when tracked files changed; else ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_cells_csv(path: Path, config_hash: str, force: bool) -> set[str]:
    """Check an existing ``cells.csv`` (ours, same config unless ``force``), mend a torn last line,
    create it when missing; return the ids of the finished cells."""
    if not path.exists():
        _atomic_write(path, ",".join(CELL_COLUMNS) + "\n")
        return set()
    text = path.read_text(encoding="utf-8")
    header = text.split("\n", 1)[0].strip()
    if header != ",".join(CELL_COLUMNS):
        raise DataFileError(
            f"{path} exists and is not a tokext sweep results file (its header is {header[:80]!r}): "
            "choose another --out"
        )
    if not text.endswith("\n"):  # killed in the middle of a row: drop the torn row
        _atomic_write(path, text[: text.rfind("\n") + 1])
    done = pd.read_csv(path, dtype=str, keep_default_na=False)
    other = sorted(set(done["config_hash"]) - {config_hash})
    if other and not force:
        raise InputError(
            f"{path} holds results of a different config (hash {', '.join(other)}; this config is "
            f"{config_hash}): pass --force to add to it (matching cells are reused, nothing is "
            "deleted), or --out DIR to write elsewhere"
        )
    return set(done["cell_id"])


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow([_flat(row[c]) for c in CELL_COLUMNS])
        f.flush()
        os.fsync(f.fileno())


def _flat(value: Any) -> Any:
    return " ".join(value.split()) if isinstance(value, str) else value


def _save_config(out: Path, config: StudyConfig) -> None:
    h = config.config_hash()
    if config.source and Path(config.source).is_file() and not (out / f"config-{h}.toml").exists():
        _atomic_write(out / f"config-{h}.toml", Path(config.source).read_text(encoding="utf-8"))
    _atomic_write(out / f"config-{h}.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- running


def run_sweep(
    config: StudyConfig | str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    limit: int | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
    loader: Callable[[str], Any] | None = None,
    log: Callable[[str], None] | None = None,
    executor: Any = "serial",
) -> pd.DataFrame:
    """Run every unfinished cell of ``config`` and return its rows of ``cells.csv``.

    ``limit``: at most this many items per cell. ``models``: replaces the config's models (the same
    study on another model). ``loader``: model spec -> model (default :func:`tokext.load_model`
    with the config's ``dtype`` and ``[resources]`` placement). ``executor``: ``"serial"`` (this
    process), ``"ray"`` (a local Ray cluster, started and stopped here) or an executor object of
    :mod:`tokext.studies.executors` (e.g. ``RayExecutor(address=...)``, left open for the caller).
    Everything is validated (config, data files, interventions) before the first model loads, and
    each model's interventions are bound to it before its first cell runs.
    """
    from tqdm.auto import tqdm

    from tokext.studies.executors import make_executor

    if not isinstance(config, StudyConfig):
        config = load_config(config)
    if models:
        config = config.replace(models=tuple(models))
    config = with_limit(config, limit)
    log = log or (lambda msg: tqdm.write(msg))
    validate(config)
    owned = isinstance(executor, str) or executor is None
    if owned:
        executor = make_executor(executor)
    if executor.name == "serial" and loader is None:  # placement checked before anything loads
        from tokext.models.devices import check_placement, normalized_max_memory

        place = config.resources.placement()
        check_placement(
            place.get("device"),
            place.get("device_map"),
            place.get("n_devices"),
            normalized_max_memory(place.get("max_memory")),
        )
    try:
        executor.connect()  # a cluster that does not answer fails here, before anything is written
        return _run_on(
            executor,
            config,
            Path(out) if out is not None else default_out_dir(config, limit),
            force,
            loader,
            progress,
            log,
        )
    finally:
        if owned:
            executor.close()


def _run_on(
    executor: Any,
    config: StudyConfig,
    out: Path,
    force: bool,
    loader: Callable[[str], Any] | None,
    progress: bool,
    log: Callable[[str], None],
) -> pd.DataFrame:
    """The body of :func:`run_sweep` once the executor is connected: prepare ``out``, run, read back."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "items").mkdir(exist_ok=True)
    chash = config.config_hash()
    cells_csv = out / "cells.csv"
    done = _prepare_cells_csv(cells_csv, chash, force)
    _save_config(out, config)
    cells = expand(config)
    todo = [c for c in cells if c.id not in done]
    log(f"{config.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run -> {out}/")
    items = {spec: spec.load() for spec in {c.spec for c in todo}}
    rev = git_revision()
    bar = tqdm(total=len(todo), desc=config.name, disable=not progress, unit="cell")
    done_cell = _writer(config, out, cells_csv, chash, rev, bar, log)
    try:
        executor.run(config, todo, items, done_cell, loader=loader, progress=progress, log=log)
    except KeyboardInterrupt:
        log(f"interrupted: {bar.n} cell(s) of this run are saved in {cells_csv}; rerun the same command to resume")
        raise
    finally:
        bar.close()
    table = read_cells(out)
    table = table[table["cell_id"].isin({c.id for c in cells})].reset_index(drop=True)
    table.attrs["out"] = str(out)
    return table


def _writer(
    config: StudyConfig, out: Path, cells_csv: Path, chash: str, rev: str, bar: Any, log: Callable[[str], None]
) -> Callable[[Cell, pd.DataFrame, float], None]:
    """What the driver does with each finished cell: its items file (atomically), then its row."""
    from tokext.version import __version__

    def done(cell: Cell, df: pd.DataFrame, seconds: float) -> None:
        _atomic_write(out / "items" / f"{cell.id}.csv", df.to_csv(index=False, lineterminator="\n"))
        row = _row(cell, df, seconds, config, chash, rev, __version__)
        _append_row(cells_csv, row)
        bar.update(1)
        log(
            f"  {cell.spec.task} {cell.spec.level_label} {cell.spec.method}{' cot' if cell.spec.cot else ''} "
            f"seed {cell.spec.seed} {cell.intervention_repr}: acc {row['accuracy']:.3f} loss {row['loss']:.3f} "
            f"(n={row['n_items']}, {seconds:.0f} s)"
        )

    return done


def _row(
    cell: Cell, df: pd.DataFrame, seconds: float, config: StudyConfig, chash: str, rev: str, version: str
) -> dict[str, Any]:
    loss = df["loss"].astype(float)
    return {
        "cell_id": cell.id,
        "baseline_id": cell.baseline_id,
        "config_hash": chash,
        "study": config.name,
        "model": cell.model,
        "task": cell.spec.task,
        "method": cell.spec.method,
        "level": cell.spec.level_label,
        "cot": cell.spec.cot,
        "seed": cell.spec.seed,
        "shots": cell.spec.shots,
        "n_items": len(df),
        "label": cell.label,
        "intervention": cell.intervention_repr,
        "params": canonical_json(cell.params),
        "accuracy": float(df["correct"].mean()),
        "acc_norm": float(df["correct_norm"].mean()) if "correct_norm" in df else float("nan"),
        "loss": float(loss.mean()) if loss.notna().any() else float("nan"),
        "n_correct": int(df["correct"].sum()),
        "seconds": round(seconds, 2),
        "git_rev": rev,
        "tokext_version": version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "spec": canonical_json(cell.spec.to_dict()),
    }


# ---------------------------------------------------------------------- reading and statistics


def read_cells(results_dir: str | Path) -> pd.DataFrame:
    """``cells.csv`` of a results directory (ids as strings; a repeated cell keeps its last row)."""
    path = Path(results_dir) / "cells.csv"
    if not path.is_file():
        raise DataFileError(f"no sweep results in {results_dir}: {path} is missing")
    table = pd.read_csv(
        path, dtype={"cell_id": str, "baseline_id": str, "config_hash": str, "level": str, "git_rev": str}
    )
    return table.drop_duplicates("cell_id", keep="last").reset_index(drop=True)


def load_items(results_dir: str | Path, cell_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-item rows of the given (default: all finished) cells, with their ``cell_id``."""
    ids = list(cell_ids) if cell_ids is not None else list(read_cells(results_dir)["cell_id"])
    frames = []
    for cid in ids:
        path = Path(results_dir) / "items" / f"{cid}.csv"
        if not path.is_file():
            raise DataFileError(f"per-item results of cell {cid} are missing: {path}")
        frames.append(pd.read_csv(path, dtype={"cell_id": str, "id": str, "gold": str, "extracted": str}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarize(results_dir: str | Path, *, n_boot: int = 10000, seed: int = 0, write: bool = True) -> pd.DataFrame:
    """``cells.csv`` plus, per cell, paired statistics against its baseline on the same items.

    Added columns: acc_baseline, diff (accuracy minus baseline), ci_lo / ci_hi (paired bootstrap
    95% CI), p_mcnemar (exact), n01 / n10 (items fixed / broken), n_paired, loss_baseline,
    delta_loss (mean loss minus the baseline's) and dloss_lo / dloss_hi (paired bootstrap 95% CI of
    the per-item loss change; NaN where the cell has no loss). Baseline rows carry diff 0 and p 1.
    Written to ``summary.csv`` with ``write``.
    """
    from tokext.studies.paired import paired_mean_ci, paired_summary

    cells = read_cells(results_dir)
    items = (
        {cid: df for cid, df in load_items(results_dir, list(cells["cell_id"])).groupby("cell_id")}
        if len(cells)
        else {}
    )
    by_id = cells.set_index("cell_id")
    stats = []
    for _, row in cells.iterrows():
        base_id = row["baseline_id"]
        if base_id not in items:
            stats.append({c: float("nan") for c in PAIRED_COLUMNS})
            continue
        merged = items[base_id][["id", "correct", "loss"]].merge(
            items[row["cell_id"]][["id", "correct", "loss"]], on="id", suffixes=("_b", "_m")
        )
        if merged.empty:
            raise DataFileError(f"cell {row['cell_id']} shares no item with its baseline {base_id}")
        if merged["correct_b"].isna().all():  # no accuracy (task 'perplexity'): only the loss is paired
            s = dict.fromkeys(("acc_baseline", "diff", "ci_lo", "ci_hi", "p_mcnemar", "n01", "n10"), float("nan"))
            s["n"] = len(merged)
        else:
            s = paired_summary(
                merged["correct_b"].astype(bool).to_numpy(),
                merged["correct_m"].astype(bool).to_numpy(),
                n_boot=n_boot,
                seed=seed,
            )
        base_loss = float(by_id.loc[base_id, "loss"])
        _, dloss_lo, dloss_hi = paired_mean_ci(
            merged["loss_b"].astype(float).to_numpy(),
            merged["loss_m"].astype(float).to_numpy(),
            n_boot=n_boot,
            seed=seed,
        )
        stats.append(
            {
                "acc_baseline": s["acc_baseline"],
                "diff": s["diff"],
                "ci_lo": s["ci_lo"],
                "ci_hi": s["ci_hi"],
                "p_mcnemar": s["p_mcnemar"],
                "n01": s["n01"],
                "n10": s["n10"],
                "n_paired": s["n"],
                "loss_baseline": base_loss,
                "delta_loss": float(row["loss"]) - base_loss,
                "dloss_lo": dloss_lo,
                "dloss_hi": dloss_hi,
            }
        )
    table = pd.concat([cells, pd.DataFrame(stats, columns=list(PAIRED_COLUMNS), index=cells.index)], axis=1)
    if write:
        _atomic_write(Path(results_dir) / "summary.csv", table.to_csv(index=False, lineterminator="\n"))
    return table


def format_summary(table: pd.DataFrame) -> str:
    """A compact text table: task, level, method, n, accuracy, diff [95% CI], p, loss, delta loss, intervention."""

    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if pd.notna(value) else ""

    lines = [
        f"{'task':<16}{'level':<11}{'method':<13}{'cot':<4}{'n':>4} {'acc':>6} {'diff':>7} {'95% CI':>16} "
        f"{'p':>6} {'loss':>6} {'dloss':>7}  intervention"
    ]
    for _, r in table.iterrows():
        ci = f"[{r['ci_lo']:+.3f},{r['ci_hi']:+.3f}]" if pd.notna(r.get("ci_lo")) else ""
        lines.append(
            f"{r['task']:<16}{str(r['level']):<11}{r['method']:<13}{'y' if r['cot'] else 'n':<4}"
            f"{int(r['n_items']):>4} {r['accuracy']:>6.3f} {num(r.get('diff'), '+.3f'):>7} {ci:>16} "
            f"{num(r.get('p_mcnemar'), '.3f'):>6} {num(r['loss'], '.3f'):>6} "
            f"{num(r.get('delta_loss'), '+.3f'):>7}  {r['intervention']}"
        )
    return "\n".join(lines)
