"""``tokext eval``: lm-evaluation-harness runs of a baseline and of each intervention on the same
samples, and the paired difference of each against the baseline.

Every run is one ``lm_eval.simple_evaluate`` of the ``tokext`` model type
(:class:`tokext.evaluation.lm_eval_adapter.TokextLM`) with ``log_samples``; lm-eval takes the first
``limit`` documents of every task, so all runs score the same items (checked through lm-eval's
``doc_id`` and ``prompt_hash``). Layout of the output directory::

    runs/<label>/run.json             the settings of the run (its key) and provenance
    runs/<label>/results.json         lm-eval's results JSON (what ``lm_eval --output_path`` writes)
    runs/<label>/samples/<task>.jsonl lm-eval's per-sample records (``--log_samples``)
    items.csv                         one row per run x task x document x 0/1 metric
    paired.csv                        per intervention x task or group x metric: accuracies, difference,
                                      95% paired-bootstrap CI, exact McNemar p (tokext.studies.paired)

A run whose ``results.json`` exists with the same settings is reused, not redone; ``results.json``
is written last and atomically, so an interrupted run is redone whole. A run directory holding
other settings, or a table file that tokext did not write, stops the command before any work.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tokext.errors import DataFileError, InputError
from tokext.studies.config import canonical_json
from tokext.studies.sweep import _atomic_write, git_revision

BASELINE = "baseline"
ITEM_COLUMNS = ("run", "intervention", "task", "doc_id", "prompt_hash", "metric", "value")
PAIRED_COLUMNS = (
    "run",
    "intervention",
    "task",
    "kind",
    "metric",
    "n",
    "acc_baseline",
    "acc_method",
    "diff",
    "ci_lo",
    "ci_hi",
    "p_mcnemar",
    "n01",
    "n10",
)


@dataclass(frozen=True)
class EvalRun:
    """One lm-eval run: no intervention (the baseline) or the interventions written in ``text``."""

    label: str
    text: str  # canonical: the repr of the parsed interventions ("" for the baseline)
    interventions: tuple[Any, ...] = ()


def plan_runs(interventions: Sequence[str]) -> list[EvalRun]:
    """The baseline, then one run per intervention text (parsed now: a bad one stops everything)."""
    from tokext.evaluation.lm_eval_adapter import as_interventions

    runs = [EvalRun(BASELINE, "")]
    for text in interventions:
        ivs = as_interventions(text)
        if not ivs:
            raise InputError(f"empty intervention {text!r}")
        canonical = repr(ivs[0]) if len(ivs) == 1 else "[" + ", ".join(map(repr, ivs)) + "]"
        if canonical in {r.text for r in runs}:
            raise InputError(f"intervention {text!r} is given twice (as {canonical})")
        slug = re.sub(r"[^A-Za-z0-9=.,-]+", "_", canonical).strip("_")[:60]
        runs.append(EvalRun(f"{slug}-{hashlib.sha1(canonical.encode()).hexdigest()[:6]}", canonical, ivs))
    return runs


def default_out_dir(model: str, limit: int | None) -> Path:
    name = Path(str(model).rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path("results") / "lm_eval" / (name + (f"-limit{limit}" if limit else ""))


def run_lm_eval(
    model: str = "smollm2-135m",
    tasks: Sequence[str] = ("tokext_mmlu",),
    interventions: Sequence[str] = (),
    *,
    limit: int | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
    include_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    loader: Callable[[str, str | None], Any] | None = None,
) -> pd.DataFrame:
    """Run the baseline and every intervention on ``tasks`` and return the paired table (also ``paired.csv``).

    ``model``: a tokext model spec (:func:`tokext.load_model`). ``tasks``: lm-eval task or group
    names (``tokext_mmlu``, and lm-eval's own with hub access). ``interventions``: texts such as
    ``"EarlyLayerEmulation(alpha=0.2)"`` (one run each; a list of calls is one combined run).
    ``limit``: the first N documents of every task. ``include_path`` / ``metadata``: as lm-eval's
    ``TaskManager`` takes them. ``device``: default CUDA when there is one. ``loader(model, device)``:
    what loads the model (default :func:`tokext.load_model`).
    """
    from tokext.evaluation.lm_eval_tasks import resolve_tasks, task_manager

    for name, value, low in (("limit", limit, 1), ("batch_size", batch_size, 1), ("num_fewshot", num_fewshot, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    runs = plan_runs(interventions)
    if loader is None:
        from tokext.studies.config import check_model_spec

        check_model_spec(model)
    out = Path(out) if out is not None else default_out_dir(model, limit)
    _check_table_files(out)
    manager = task_manager(include_path, metadata)
    names = resolve_tasks(tasks, manager)
    key = {
        "model": model,
        "tasks": names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "metadata": metadata or {},
        "include_path": None if include_path is None else str(include_path),
        "engine": "hooks",
        "lm_eval": _lm_eval_version(),
    }
    todo = [run for run in runs if not _finished(out / "runs" / run.label, key | {"interventions": run.text})]
    say = log or (lambda message: None)
    bridge = None
    for i, run in enumerate(runs, 1):
        folder = out / "runs" / run.label
        if run not in todo:
            say(f"[{i}/{len(runs)}] {run.text or BASELINE}: finished earlier, reusing {folder}")
            continue
        if bridge is None:
            say(f"loading {model}")
            bridge = (loader or _load)(model, device)
        say(
            f"[{i}/{len(runs)}] {run.text or BASELINE}: lm-eval on {', '.join(names)}"
            + (f", first {limit} documents per task" if limit else "")
        )
        started = time.time()
        _run_one(bridge, run, names, manager, folder, key, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
        say(f"[{i}/{len(runs)}] done in {time.time() - started:.0f} s: {folder}/results.json")
    items = load_items(out, runs)
    table = paired_table(items, group_leaves(out / "runs" / BASELINE / "results.json"))
    _atomic_write(out / "items.csv", items.to_csv(index=False))
    _atomic_write(out / "paired.csv", table.to_csv(index=False))
    table.attrs["out"] = str(out)
    return table


def _load(model: str, device: str | None) -> Any:
    from tokext.evaluation.lm_eval_adapter import default_device
    from tokext.models.loading import load_model

    return load_model(model, device=default_device(device))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# ---------------------------------------------------------------------- one run


def _finished(folder: Path, key: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished run of ``key``; raises when it holds another run's files."""
    settings = folder / "run.json"
    if not folder.exists():
        return False
    if not settings.exists():
        if any(folder.iterdir()):
            raise DataFileError(
                f"{folder} exists and was not written by tokext eval (no run.json): choose another --out"
            )
        return False
    try:
        saved = json.loads(settings.read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataFileError(f"{settings} is not a tokext eval run file: choose another --out") from None
    if canonical_json(saved) != canonical_json(key):
        changed = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        raise InputError(
            f"{folder} holds a run with other settings ({', '.join(changed)} differ): "
            "choose another --out, or delete that run folder to redo it"
        )
    return (folder / "results.json").exists()


def _check_table_files(out: Path) -> None:
    for name, columns in (("items.csv", ITEM_COLUMNS), ("paired.csv", PAIRED_COLUMNS)):
        path = out / name
        if path.exists():
            header = path.read_text(encoding="utf-8").split("\n", 1)[0].strip()
            if header != ",".join(columns):
                raise DataFileError(
                    f"{path} exists and is not a tokext eval table (header {header[:60]!r}): choose another --out"
                )


def _run_one(
    bridge: Any,
    run: EvalRun,
    tasks: list[str],
    manager: Any,
    folder: Path,
    key: dict[str, Any],
    *,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
) -> None:
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from tokext.evaluation.lm_eval_adapter import TokextLM
    from tokext.version import __version__

    (folder / "samples").mkdir(parents=True, exist_ok=True)
    provenance = {
        "key": key | {"interventions": run.text},
        "label": run.label,
        "batch_size": batch_size,
        "device": str(next(bridge.parameters()).device),
        "git_rev": git_revision(),
        "tokext_version": __version__,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    _atomic_write(folder / "run.json", json.dumps(provenance, indent=2) + "\n")
    lm = TokextLM(model=bridge, intervention=list(run.interventions), batch_size=batch_size)
    lm.spec = key["model"]
    with _quiet_custom_dataset_warning():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, log_samples=True, task_manager=manager
        )

    def dump(obj: Any) -> str:
        return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False)

    for task, samples in results.pop("samples").items():
        _atomic_write(folder / "samples" / f"{task}.jsonl", "".join(dump(s) + "\n" for s in samples))
    _atomic_write(
        folder / "results.json",
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
    )


@contextmanager
def _quiet_custom_dataset_warning() -> Iterator[None]:
    """lm-eval warns once per task that builds its data with a function (each of the 57 tokext_mmlu tasks)."""
    from tokext.evaluation.lm_eval_adapter import drop_log_messages

    with drop_log_messages(
        "lm_eval.api.task", "Custom kwargs can be passed to `--metadata`", "For example --metadata="
    ):
        yield


# ---------------------------------------------------------------------- the paired table


def load_items(out: str | Path, runs: Sequence[EvalRun]) -> pd.DataFrame:
    """Every 0/1 per-sample metric of every run's ``samples/*.jsonl`` (columns :data:`ITEM_COLUMNS`)."""
    rows = []
    for run in runs:
        for path in sorted((Path(out) / "runs" / run.label / "samples").glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                sample = json.loads(line)
                for metric in sample.get("metrics", []):
                    value = sample.get(metric)
                    if isinstance(value, (bool, int, float)) and value in (0, 1):
                        rows.append(
                            {
                                "run": run.label,
                                "intervention": run.text or BASELINE,
                                "task": path.stem,
                                "doc_id": int(sample["doc_id"]),
                                "prompt_hash": str(sample["prompt_hash"])[:16],
                                "metric": metric,
                                "value": int(value),
                            }
                        )
    return pd.DataFrame(rows, columns=list(ITEM_COLUMNS))


def group_leaves(results_path: str | Path) -> dict[str, list[str]]:
    """Group name -> its leaf tasks, from lm-eval's ``group_subtasks`` (groups of groups resolved)."""
    subtasks = json.loads(Path(results_path).read_text(encoding="utf-8")).get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for child in subtasks[name] for leaf in (leaves(child) if child in subtasks else [child])]

    return {group: leaves(group) for group in subtasks if subtasks[group]}


def paired_table(items: pd.DataFrame, groups: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Each intervention run against the baseline, per task and per group (its tasks' items pooled),
    per 0/1 metric: :func:`tokext.studies.paired.paired_summary` over the same documents."""
    from tokext.studies.paired import paired_summary

    groups = groups or {}
    base = items[items["run"] == BASELINE]
    rows = []
    for (run, text), method in items[items["run"] != BASELINE].groupby(["run", "intervention"], sort=False):
        units = [(g, "group", leaves) for g, leaves in groups.items()] + [
            (t, "task", [t]) for t in base["task"].unique()
        ]
        for name, kind, leaves in units:
            for metric in base.loc[base["task"].isin(leaves), "metric"].unique():
                b = _aligned(base, leaves, metric)
                m = _aligned(method, leaves, metric)
                if not b.index.equals(m.index) or not (b["prompt_hash"] == m["prompt_hash"]).all():
                    raise DataFileError(f"{name} ({metric}): run {run} and the baseline scored different samples")
                stats = paired_summary(b["value"].to_numpy(bool), m["value"].to_numpy(bool))
                rows.append(
                    {
                        "run": run,
                        "intervention": text,
                        "task": name,
                        "kind": kind,
                        "metric": metric,
                        **{k: stats[k] for k in PAIRED_COLUMNS if k in stats},
                    }
                )
    table = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    table.attrs["groups"] = groups
    return table


def _aligned(items: pd.DataFrame, tasks: list[str], metric: str) -> pd.DataFrame:
    chosen = items[items["task"].isin(tasks) & (items["metric"] == metric)]
    return chosen.set_index(["task", "doc_id"]).sort_index()[["prompt_hash", "value"]]


def format_table(table: pd.DataFrame, max_tasks: int = 12) -> str:
    """A text table of the paired differences: every group, and the tasks when there are at most
    ``max_tasks`` of them (else only tasks in no group). All rows are in ``paired.csv``."""
    members = set().union(*table.attrs.get("groups", {}).values())
    tasks = table[table["kind"] == "task"]
    shown = table if tasks["task"].nunique() <= max_tasks else table[~table["task"].isin(members)]
    lines = [
        f"{'task':<34}{'metric':<10}{'n':>5} {'base':>6} {'method':>6} {'diff':>7} {'95% CI':>17} "
        f"{'McNemar p':>10} {'n01':>4} {'n10':>4}  intervention"
    ]
    for _, r in shown.iterrows():
        ci = f"[{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}]"
        lines.append(
            f"{r['task']:<34}{r['metric']:<10}{int(r['n']):>5} {r['acc_baseline']:>6.3f} "
            f"{r['acc_method']:>6.3f} {r['diff']:>+7.3f} {ci:>17} {r['p_mcnemar']:>10.3f} "
            f"{int(r['n01']):>4} {int(r['n10']):>4}  {r['intervention']}"
        )
    if len(shown) < len(table):
        lines.append(f"({len(table) - len(shown)} per-task rows of grouped tasks are in paired.csv)")
    return "\n".join(lines)
